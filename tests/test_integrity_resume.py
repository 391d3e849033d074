"""Crash-safe resume: a real extraction subprocess is killed with SIGKILL at several moments.

After each kill the store still opens and every committed row (in the store or in a part file) is
correct; rerunning the same command finishes the job, and the final store equals a run that was
never interrupted: same ids, labels, splits, content fingerprints and failures, embeddings within
1e-4 per element. Parts are committed every 2 rows so that kills land between many commits.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import skimage.data
from PIL import Image

# Internals, on purpose: the store's parts and the engine's counts after SIGKILL are what is tested; the killed
# process is a real extraction.
from featurebank.features.backbones import create_backbone
from featurebank.features.engine import extract
from featurebank.features.store import strings, read_features

ROOT = Path(__file__).resolve().parents[1]
ROWS_PER_PART = 2
EXTRACT = (
    "import sys\n"
    "from features.engine import extract\n"
    f"extract(sys.argv[1], 'efficientnet_lite0', sys.argv[2], rows_per_part={ROWS_PER_PART}, seconds_per_part=60,\n"
    "        workers=0, batch_size=2, progress=False)\n"
)


def make_folder(root: Path, per_class: int = 4) -> Path:
    for name, picture in (("cat", skimage.data.chelsea()), ("coffee", skimage.data.coffee())):
        (root / name).mkdir(parents=True)
        base = Image.fromarray(picture).resize((64, 48))
        for k in range(per_class):
            base.rotate(k * 15).save(root / name / f"{k:02d}.png")
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Path(os.fsdecode(bytes(root / "coffee") + b"/caf\xe9 au lait.png")).write_bytes(
        (root / "coffee" / "00.png").read_bytes())
    return root


def snapshot(path: Path) -> dict:
    """Everything a store holds, as comparable Python values."""
    feats = read_features(path)
    with h5py.File(path, "r") as f:
        content = strings(f["content"])
        failures = sorted(zip(strings(f["failures/ids"]), strings(f["failures/reasons"]),
                              strings(f["failures/content"])))
    return {"ids": feats.ids, "labels": [feats.class_names[y] if y >= 0 else None for y in feats.y],
            "splits": list(feats.splits), "content": content, "failures": failures, "X": feats.X}


def assert_same_store(got: dict, want: dict) -> None:
    assert got["ids"] == want["ids"] and len(set(got["ids"])) == len(got["ids"])
    for key in ("labels", "splits", "content", "failures"):
        assert got[key] == want[key], key
    np.testing.assert_allclose(got["X"], want["X"], atol=1e-4, rtol=0)


def assert_committed_rows_correct(store_dir: Path, want: dict) -> int:
    """The store (if any) opens and each row in it and in every committed part equals the clean run's."""
    rows = {i: x for i, x in zip(want["ids"], want["X"])}
    checked = 0
    for path in sorted(store_dir.glob("*.h5")) + sorted(store_dir.glob("*.parts/part-*.h5")):
        if path.suffix == ".h5" and path.parent == store_dir:
            snap = snapshot(path)  # read_features: the store opens and is complete
            ids, X = snap["ids"], snap["X"]
        else:
            with h5py.File(path, "r") as f:
                ids, X = strings(f["ids"]), f["embeddings"][()]
        for i, x in zip(ids, X):
            np.testing.assert_allclose(x, rows[i], atol=1e-4, rtol=0)
            checked += 1
    return checked


def start(source: Path, store_dir: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", EXTRACT, str(source), str(store_dir)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(proc: subprocess.Popen, condition, timeout: float = 120.0) -> bool:
    """Poll every 2 ms until ``condition()``; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    raise AssertionError("timed out waiting for the extraction")


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def own_parts(store_dir: Path, proc: subprocess.Popen) -> list[Path]:
    return [p for p in store_dir.glob("*.parts/part-*.h5") if f"-{proc.pid}-" in p.name]


def merging(store_dir: Path, proc: subprocess.Popen) -> bool:
    return any(store_dir.glob(f".*.h5.{proc.pid}.tmp"))


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """The folder and the store of a run that was never interrupted (same settings, in this process)."""
    source = make_folder(tmp_path_factory.mktemp("resume") / "pets")
    store_dir = tmp_path_factory.mktemp("clean-store")
    result = extract(source, create_backbone(), store_dir, rows_per_part=ROWS_PER_PART, workers=0, batch_size=2,
                     progress=False)
    return source, snapshot(result.path)


def resume_and_compare(source, store_dir, want) -> None:
    """Run the same command again to the end; the store must equal the clean run's."""
    proc = start(source, store_dir)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode(errors="replace")
    (store,) = store_dir.glob("*.h5")
    assert_same_store(snapshot(store), want)


def test_killed_at_several_moments_then_resumed_equals_a_clean_run(clean_run, tmp_path):
    source, want = clean_run
    store_dir = tmp_path / "store"
    moments = []

    # 1. early: while the process is still starting (imports, backbone)
    proc = start(source, store_dir)
    time.sleep(0.5)
    kill(proc)
    moments.append("after 0.5 s")
    assert_committed_rows_correct(store_dir, want)

    # 2. as soon as its first part file is committed
    proc = start(source, store_dir)
    assert wait_for(proc, lambda: own_parts(store_dir, proc))
    kill(proc)
    moments.append("after the first part")
    first = assert_committed_rows_correct(store_dir, want)
    assert first >= ROWS_PER_PART

    # 3. during the final merge: the new store file is half-written under its temporary name
    proc = start(source, store_dir)
    assert wait_for(proc, lambda: merging(store_dir, proc)), proc.communicate()
    kill(proc)
    moments.append("during the merge")
    assert list(store_dir.glob(".*.tmp")), "the kill should have left the merge's temporary file"
    assert_committed_rows_correct(store_dir, want)

    # 4. the same command again finishes the job
    resume_and_compare(source, store_dir, want)
    assert not list(store_dir.glob(".*.tmp")) and not list(store_dir.glob("*.parts")), "leftovers not cleaned"
    print("killed", ", ".join(moments), "then resumed: equal to the clean run")


def test_killed_at_random_moments_then_resumed_equals_a_clean_run(clean_run, tmp_path):
    source, want = clean_run
    store_dir = tmp_path / "store"
    rng = random.Random(int(os.environ.get("FEATUREBANK_TEST_SEED", "3")))
    kills = 0
    for _ in range(2):
        proc = start(source, store_dir)
        # kill some time after the backbone is loaded and parts start coming (or the run ends first)
        wait_for(proc, lambda p=proc: own_parts(store_dir, p) or merging(store_dir, p))
        time.sleep(rng.uniform(0.0, 1.0))
        if proc.poll() is None:
            kill(proc)
            kills += 1
        assert_committed_rows_correct(store_dir, want)
    resume_and_compare(source, store_dir, want)
    assert kills >= 1
