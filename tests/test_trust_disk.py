"""Where writing fails, the line names the path and what to do: a run on a full disk (a real 256 kB tmpfs
mounted in a user namespace), a converted-model cache that is a file (the torch runtime takes over with
one line); and validation names options as the user types them (--store, --batch-size), not fields."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featurebank.features.store import StoreConfig, StoreWriter, store_path
from featurebank.pipelines.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _can_mount() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


def _random_store(store_dir: Path, n: int = 240, dim: int = 512) -> Path:
    config = StoreConfig("test-backbone", "0" * 64, {"size": 8}, "pool", "avg", "float32", dim)
    ids = [f"s{k:03d}.png" for k in range(n)]
    path = store_path(store_dir, "toy", config)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = [str(k % 3) for k in range(n)]
    X = rng.normal(size=(n, dim)).astype(np.float32) + np.repeat(np.arange(n) % 3, dim).reshape(n, dim)
    with StoreWriter(path, config, "toy") as w:
        w.add(ids, X, ["stat:1:1"] * n)
        w.finish(ids, labels, ["test" if k % 5 == 0 else "train" for k in range(n)], ["stat:1:1"] * n)
    os.unlink(str(path) + ".lock")
    return path


@pytest.mark.skipif(not _can_mount(), reason="needs unshare and a tmpfs mount in a user namespace")
def test_train_on_a_full_disk_names_the_folder_and_what_to_do(tmp_path):
    """A 256 kB tmpfs: the kNN probe's saved bank (240 x 512 float32, 480 kB) cannot fit. The run ends with
    one line naming --out's folder, nothing of the run is left, and the exit status is 1 (it said
    '[Errno 28] No space left on device' and nothing else)."""
    store = _random_store(tmp_path / "store")
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "runs"
    script = (f"mount -t tmpfs -o size=256k tmpfs {disk} && {sys.executable} -m featurebank.pipelines.cli train {store} "
              f"--out {out} --probes knn; echo \"exit=$?\"; ls -A {out}")
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    errors = [line for line in done.stderr.splitlines() if line.startswith("featurebank: error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"into {out}: No space left on device" in errors[0], errors[0]
    assert "free space on the disk of" in errors[0] and "or give another --out" in errors[0]
    assert "exit=1" in done.stdout
    assert done.stdout.split("exit=1", 1)[1].split() == [".featurebank-runs.lock"]  # no run, no temporary folder


def test_a_cache_dir_that_is_a_file_falls_back_to_torch_with_one_line(tmp_path, monkeypatch, capsys):
    from ops_images import write_folder

    write_folder(tmp_path / "digits", n_per_class=2)
    not_a_folder = tmp_path / "cache-file"
    not_a_folder.write_text("a file, not a folder")
    monkeypatch.setenv("FEATUREBANK_CACHE_DIR", str(not_a_folder))
    assert main(["extract", str(tmp_path / "digits"), "--store", str(tmp_path / "store"), "--workers", "0"]) == 0
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if str(not_a_folder) in line]
    assert said == [f"runtime: torch (the model cache {not_a_folder} cannot be used (Not a directory); "
                    "set FEATUREBANK_CACHE_DIR to a folder you can write)"], err
    assert "converting" not in err and "Traceback" not in err


@pytest.mark.parametrize("args, config, expected", [
    (["--batch-size", "0"], None, "featurebank: error: --batch-size: Input should be greater than or equal to 1"),
    ([], "store = 5\n", "featurebank: error: --store: Input should be a valid string"),
    (["--workers", "99"], None, "featurebank: error: --workers: Input should be less than or equal to 64"),
])
def test_validation_names_the_options_not_the_fields(tmp_path, capsys, args, config, expected):
    from ops_images import write_folder

    write_folder(tmp_path / "digits", n_per_class=2)
    if config:
        (tmp_path / "run.toml").write_text(config)
        args = [*args, "--config", str(tmp_path / "run.toml")]
    assert main(["extract", str(tmp_path / "digits"), *args]) == 2
    err = capsys.readouterr().err
    assert err.strip() == expected, err
