"""Cache integrity of the store: per-sample reuse, retrying failures, leftovers of killed writers,
one writer at a time, write failures that keep what was committed, damaged files and safe loading."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import skimage.data
from PIL import Image

# Internals, on purpose: the store writer's crash safety, locks and write failures: internals by design.
from featurebank.classifiers.persist import ClassifierError, load_classifier, save_classifier
from featurebank.features.backbones import BackboneError, create_backbone
from featurebank.features.engine import extract
from featurebank.features.store import StoreError, StoreWriter, strings, open_store, read_features

ROOT = Path(__file__).resolve().parents[1]
PICTURES = [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut()]


def picture(k: int) -> Image.Image:
    """A distinct small picture for each k."""
    return Image.fromarray(PICTURES[k % 3]).resize((48, 48)).rotate(k * 25)


def make_folder(root: Path, n_per_class: int = 3) -> Path:
    for c, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(n_per_class):
            picture(3 * c + k).save(root / name / f"{k}.png")
    return root


def snapshot(path: Path) -> dict:
    feats = read_features(path)
    with h5py.File(path, "r") as f:
        content = strings(f["content"])
        failures = sorted(zip(strings(f["failures/ids"]), strings(f["failures/reasons"])))
    return {"ids": feats.ids, "labels": [feats.class_names[y] for y in feats.y], "splits": list(feats.splits),
            "content": content, "failures": failures, "X": feats.X}


def assert_same(got: dict, want: dict) -> None:
    for key in ("ids", "labels", "splits", "content", "failures"):
        assert got[key] == want[key], key
    np.testing.assert_allclose(got["X"], want["X"], atol=1e-4, rtol=0)


def listing(folder: Path) -> dict:
    """Every file under a folder with its size and mtime (folders by name): to prove that nothing changed."""
    return {str(p): None if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*")} if folder.exists() else {}


@pytest.fixture(scope="module")
def backbone():
    return create_backbone()


def run(source, backbone, store_dir, **kw):
    return extract(source, backbone, store_dir, progress=False, workers=0, batch_size=8, **kw)


def test_rerun_embeds_only_new_and_changed_samples_and_drops_removed_ones(tmp_path, backbone):
    source = make_folder(tmp_path / "pets")
    first = run(source, backbone, tmp_path / "store")
    assert (first.embedded, first.reused, first.rows) == (6, 0, 6)
    again = run(source, backbone, tmp_path / "store")
    assert (again.embedded, again.reused, again.rows) == (0, 6, 6) and "up to date" in again.summary()

    picture(7).save(source / "a" / "new.png")  # new
    changed = source / "b" / "1.png"
    picture(8).save(changed)  # changed: other pixels (other size or mtime)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    (source / "a" / "2.png").unlink()  # removed
    third = run(source, backbone, tmp_path / "store")
    assert (third.embedded, third.reused, third.removed, third.rows) == (2, 4, 1, 6)
    # the same as a store built from scratch on the folder as it is now
    fresh = run(source, backbone, tmp_path / "fresh")
    assert_same(snapshot(third.path), snapshot(fresh.path))


def test_content_hash_fingerprint_ignores_touching_and_sees_same_size_edits(tmp_path, backbone):
    source = make_folder(tmp_path / "pets", n_per_class=2)
    r = run(source, backbone, tmp_path / "store", content_hash=True)
    assert all(c.startswith("sha256:") for c in snapshot(r.path)["content"])
    target = source / "a" / "0.png"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))  # touched, same bytes
    assert run(source, backbone, tmp_path / "store", content_hash=True).embedded == 0
    # same size and same mtime, other bytes: only the content hash sees it
    data = bytearray(target.read_bytes())
    other = np.asarray(Image.open(target)).copy()
    other[:8] = 255
    Image.fromarray(other).save(target)
    new = target.read_bytes()
    if len(new) == len(data):
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    r = run(source, backbone, tmp_path / "store", content_hash=True)
    assert r.embedded == 1 and r.reused == 3


def test_failures_are_recorded_then_retried_without_redoing_the_rest(tmp_path, backbone):
    source = make_folder(tmp_path / "pets", n_per_class=2)
    bad = source / "a" / "bad.png"
    bad.write_bytes(b"not a png")
    r = run(source, backbone, tmp_path / "store")
    assert (r.embedded, r.failed, r.failed_total) == (4, 1, 1)
    assert r.failures == [("a/bad.png", "not a recognised image format")]
    # a plain rerun does not try the same bytes again
    r = run(source, backbone, tmp_path / "store")
    assert (r.embedded, r.failed, r.failed_total) == (0, 0, 1)
    # --retry-failures tries them again, and only them
    r = run(source, backbone, tmp_path / "store", retry_failures=True)
    assert (r.embedded, r.reused, r.failed, r.failed_total) == (0, 4, 1, 1)
    # the user fixes the file: its fingerprint changed, so a plain rerun picks it up
    picture(9).save(bad)
    r = run(source, backbone, tmp_path / "store")
    assert (r.embedded, r.reused, r.failed, r.failed_total, r.rows) == (1, 4, 0, 0, 5)
    assert "a/bad.png" in read_features(r.path).ids


def test_leftovers_of_killed_writers_are_cleaned_and_merged_parts_not_reapplied(tmp_path, backbone):
    source = make_folder(tmp_path / "pets", n_per_class=2)
    r = run(source, backbone, tmp_path / "store")
    want = snapshot(r.path)
    config_writer = StoreWriter(r.path, _config_of(r.path), "pets")
    # a part whose rows are wrong, merged into the store, then left behind by a kill before its deletion
    ids = want["ids"][:2]
    config_writer.add(ids, np.full((2, want["X"].shape[1]), 7.0, np.float32), want["content"][:2])
    config_writer.flush()
    (part,) = config_writer.parts_dir.glob("part-*.h5")
    kept = tmp_path / "kept.h5"
    shutil.copy(part, kept)
    config_writer.finish(want["ids"], want["labels"], want["splits"], want["content"])
    config_writer.close()
    part.parent.mkdir(exist_ok=True)
    shutil.copy(kept, part)  # as if killed between the store's rename and the parts' deletion
    # temporary files of writers killed while writing a part or the store
    (r.path.parent / f".{r.path.name}.99999.tmp").write_bytes(b"half an hdf5 file")
    (config_writer.parts_dir / f".{part.name}.99999.tmp").write_bytes(b"half a part")
    with StoreWriter(r.path, _config_of(r.path), "pets") as w:
        assert not w.needs_merge()
        assert set(w.index().content) == set(want["ids"])
    assert not list(r.path.parent.glob(".*.tmp")) and not list(config_writer.parts_dir.glob("*"))


def _config_of(path: Path):
    from featurebank.features.store import StoreConfig

    with open_store(path) as f:
        return StoreConfig(**{k: v for k, v in json.loads(f.attrs["config"]).items() if k != "format_version"})


def test_second_writer_waits_with_a_message_or_stops_clearly(tmp_path, backbone):
    source = make_folder(tmp_path / "pets", n_per_class=1)
    r = run(source, backbone, tmp_path / "store")
    # another process holds the store's writer lock for 1.5 s
    code = (
        "import json, sys, time\n"
        "from features.store import StoreConfig, StoreWriter\n"
        "w = StoreWriter(sys.argv[1], StoreConfig(**json.loads(sys.argv[2])), 'pets')\n"
        "print('locked', flush=True)\n"
        "time.sleep(1.5)\n"
    )
    config = {k: v for k, v in _config_of(r.path).as_dict().items() if k != "format_version"}
    holder = subprocess.Popen([sys.executable, "-c", code, str(r.path), json.dumps(config)], cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        said = []
        with pytest.raises(StoreError, match="another extraction is still writing"):
            run(source, backbone, tmp_path / "store", lock_timeout=0.2, say=said.append)
        assert said and said[0].startswith("waiting: another extraction")
        # without a timeout it waits, then does its work once the first writer is done
        picture(5).save(source / "b" / "late.png")
        said.clear()
        r2 = run(source, backbone, tmp_path / "store", say=said.append)
        assert holder.poll() is not None, "the second writer did not wait"
        assert said[0].startswith("waiting") and r2.embedded == 1 and r2.rows == 3
    finally:
        holder.kill()
        holder.wait()


def _start_cli_under_file_size_limits(source: Path, store_dir: Path, limits: list[int]) -> subprocess.Popen:
    """One process that runs 'featurebank extract' once per limit, each after a line on its stdin."""
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "from pipelines.cli import main\n"
        f"for limit in {limits!r}:\n"
        "    sys.stdin.readline()\n"
        "    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))\n"
        f"    code = main(['extract', {str(source)!r}, '--store', {str(store_dir)!r}, '--workers', '0'])\n"
        "    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n"
        "    sys.stderr.write('--- end of run\\n')\n"
        "    print(code, flush=True)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, text=True, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _next_run(proc: subprocess.Popen) -> int:
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return int(proc.stdout.readline().split()[-1])


def test_a_full_disk_gives_a_clear_error_and_keeps_what_was_committed(tmp_path, backbone):
    source = make_folder(tmp_path / "pets", n_per_class=3)
    store_dir = tmp_path / "store"
    r = run(source, backbone, store_dir)
    store_bytes = r.path.read_bytes()
    before_ids, before_X = snapshot(r.path)["ids"], snapshot(r.path)["X"]
    for k in range(2):
        picture(10 + k).save(source / "b" / f"new{k}.png")
    # first limit: the new part (2 rows) can be written, not the merged store (8 rows): the merge fails;
    # second limit: not even a part can be written
    proc = _start_cli_under_file_size_limits(source, store_dir, [len(store_bytes) + 1000, 2000])
    try:
        assert _next_run(proc) == 1
        assert r.path.read_bytes() == store_bytes, "the committed store was altered"
        assert len(list(store_dir.glob("*.parts/part-*.h5"))) == 1 and not list(store_dir.glob(".*.tmp"))
        (source / "b" / "new1.png").unlink()
        picture(12).save(source / "a" / "new2.png")
        before = listing(store_dir)
        assert _next_run(proc) == 1
        assert listing(store_dir) == before
    finally:
        _, err = proc.communicate(timeout=60)
    first, second = err.split("--- end of run\n")[:2]
    for output, what in ((first, "could not write " + str(r.path)), (second, "could not write to")):
        last = output.strip().splitlines()[-1]
        assert last.startswith(f"featurebank: error: {what}") and "rerun" in last, output
        assert "Traceback" not in output and "file too large" in last.lower()
    # with space again, the same command finishes the job from what was committed
    done = run(source, backbone, store_dir)
    assert (done.embedded, done.reused, done.rows) == (1, 7, 8)
    got = snapshot(done.path)
    assert len(set(got["ids"])) == 8 and set(before_ids) < set(got["ids"])
    for i, x in zip(before_ids, before_X):  # committed rows kept as they were
        np.testing.assert_allclose(got["X"][got["ids"].index(i)], x, atol=1e-6)
    assert not list(store_dir.glob("*.parts")) and not list(store_dir.glob(".*.tmp"))


def test_damaged_or_foreign_files_are_refused_in_one_line_and_left_alone(tmp_path, backbone):
    source = make_folder(tmp_path / "pets", n_per_class=1)
    r = run(source, backbone, tmp_path / "store")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(r.path.read_bytes()[: r.path.stat().st_size // 2])
    noise = tmp_path / "noise.h5"
    noise.write_bytes(os.urandom(4096))
    for path in (foreign, truncated, noise):
        with pytest.raises(StoreError) as info:
            read_features(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)
    # extraction into a store whose file is damaged: refused, and nothing created or altered
    r.path.write_bytes(truncated.read_bytes())
    os.unlink(str(r.path) + ".lock")
    before = listing(tmp_path / "store")
    with pytest.raises(StoreError, match="delete it and extract again"):
        run(source, backbone, tmp_path / "store")
    assert listing(tmp_path / "store") == before


def test_classifier_is_unpickled_only_when_its_sha256_matches(tmp_path):
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression().fit(np.random.default_rng(0).normal(size=(20, 4)), [0, 1] * 10)
    clf = save_classifier(model, tmp_path / "clf", classes=["a", "b"], store_fingerprint="f" * 64,
                          backbone="efficientnet_lite0")
    loaded, manifest = load_classifier(clf, "f" * 64)
    assert manifest["classes"] == ["a", "b"] and loaded.coef_.shape == (1, 4)
    with pytest.raises(ClassifierError, match="another backbone configuration"):
        load_classifier(clf, "e" * 64)
    data = bytearray((clf / "model.skops").read_bytes())
    data[-20] ^= 0xFF
    (clf / "model.skops").write_bytes(bytes(data))
    with pytest.raises(ClassifierError, match="does not match the sha256"):
        load_classifier(clf)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_weights_are_loaded_without_running_code(tmp_path):
    import torch

    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": _RunsCode()}}, evil)
    with pytest.raises(BackboneError, match="cannot be loaded as a state_dict"):
        create_backbone(str(evil), arch="tv:resnet18")


def test_manifest_rows_are_embedded_recorded_or_dropped_never_kept_stale(tmp_path, backbone):
    folder = make_folder(tmp_path / "pets", n_per_class=1)
    table = tmp_path / "pets.csv"
    table.write_text("path,label\npets/a/0.png,a\npets/b/0.png,b\npets/b/gone.png,b\n")
    r = run(table, backbone, tmp_path / "store")
    assert (r.embedded, r.failed) == (2, 1) and "not found" in dict(r.failures)["pets/b/gone.png"]
    # the file listed in the table disappears: marked as a failure, its old row is not kept as if present
    (folder / "a" / "0.png").unlink()
    r = run(table, backbone, tmp_path / "store")
    assert (r.embedded, r.failed, r.rows, r.failed_total) == (0, 1, 1, 2)
    assert read_features(r.path).ids == ["pets/b/0.png"]
    # a row removed from the table is dropped from the store
    table.write_text("path,label\npets/b/0.png,b\n")
    r = run(table, backbone, tmp_path / "store")
    assert (r.rows, r.failed_total, r.removed) == (1, 0, 0)


def test_an_edited_label_or_split_is_written_without_embedding_again(tmp_path, backbone):
    make_folder(tmp_path / "pets", n_per_class=2)
    table = tmp_path / "pets.csv"
    table.write_text("path,label,split\npets/a/0.png,a,train\npets/a/1.png,a,test\npets/b/0.png,b,train\n"
                     "pets/b/1.png,b,test\n")
    first = run(table, backbone, tmp_path / "store")
    assert (first.embedded, first.rows) == (4, 4)
    written = first.path.stat().st_mtime_ns
    # nothing changed: the store is not written again
    again = run(table, backbone, tmp_path / "store")
    assert (again.embedded, again.rows) == (0, 4) and again.path.stat().st_mtime_ns == written
    # a label edited: the rerun embeds nothing but writes the store with the new label
    table.write_text("path,label,split\npets/a/0.png,a,train\npets/a/1.png,b,test\npets/b/0.png,b,train\n"
                     "pets/b/1.png,b,test\n")
    r = run(table, backbone, tmp_path / "store")
    f = read_features(r.path)
    assert (r.embedded, r.reused, r.rows) == (0, 4, 4)
    assert [f.class_names[y] for y in f.y] == ["a", "b", "b", "b"]
    # a split edited: the same
    table.write_text("path,label,split\npets/a/0.png,a,train\npets/a/1.png,b,test\npets/b/0.png,b,test\n"
                     "pets/b/1.png,b,test\n")
    r = run(table, backbone, tmp_path / "store")
    assert r.embedded == 0 and list(read_features(r.path).splits) == ["train", "test", "test", "test"]
    written = r.path.stat().st_mtime_ns
    r = run(table, backbone, tmp_path / "store")
    assert r.embedded == 0 and r.path.stat().st_mtime_ns == written
