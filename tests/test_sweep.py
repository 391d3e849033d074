"""The sweep: stores identical to single extractions (same files, same rows), reuse without a forward pass,
a backbone added later runs alone, a killed sweep resumes, the ranking with its baseline and flags, and
the CLI from the sweep to `run` on its best row. Real weights (EfficientNet-Lite0/Lite1), real digits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_damaged_folder, write_digits_folder

from featurebank.features.engine import extract
from featurebank.features.registry import build_backbone
from featurebank.features.store import read_features
from featurebank.features.sweep import sweep

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"progress": False, "say": lambda s: None}


def cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """Lite0 at two layers through the default runtime (OpenVINO on a CPU: the two taps as one converted
    model, cached after the first run), 36 digits."""
    root = tmp_path_factory.mktemp("sweep")
    folder = write_digits_folder(root / "digits", per_class=12, classes=(0, 1, 7))
    store = root / "store"
    result = sweep(folder, ["efficientnet_lite0"], ["blocks.3", "final"], store, **QUIET)
    return folder, store, result


def test_sweep_stores_are_the_single_extractions_stores(swept, tmp_path):
    folder, store, result = swept
    assert [(s.backbone, s.layer) for s in result.stores] == [("efficientnet_lite0", "blocks.3"),
                                                               ("efficientnet_lite0", "final")]
    assert all(s.result.embedded == 36 and s.result.rows == 36 for s in result.stores)
    assert result.stores[0].per_second and result.stores[0].per_second == result.stores[1].per_second
    for s, layer in zip(result.stores, ("blocks.3", None)):
        backbone = build_backbone("efficientnet_lite0", layer=layer)
        # the same file name (fingerprint): extract reuses the sweep's store, with no forward pass
        again = extract(folder, backbone, store, **QUIET)
        assert again.path == s.path and again.embedded == 0 and again.reused == 36
        # and the same numbers as a single extraction by the other runtime (eager torch), in another folder
        single = extract(folder, backbone, tmp_path / "single", runtime="torch", workers=0, **QUIET)
        assert single.path.name == s.path.name
        a, b = read_features(s.path), read_features(single.path)
        assert a.ids == b.ids and a.X.shape == b.X.shape == (36, s.dim)
        assert cosines(a.X, b.X).min() >= 0.9999


def test_complete_stores_are_reused_and_a_new_backbone_runs_alone(swept):
    folder, store, _ = swept
    again = sweep(folder, ["efficientnet_lite0"], ["final", "blocks.3"], store, **QUIET)
    assert again.embedded_samples == 0 and all(s.result.embedded == 0 and s.result.reused == 36 and s.result.rows == 36
               for s in again.stores)
    more = sweep(folder, ["efficientnet_lite0", "efficientnet_lite1"], ["final"], store, runtime="torch", **QUIET)
    by = {s.backbone: s for s in more.stores}
    assert by["efficientnet_lite0"].result.embedded == 0 and by["efficientnet_lite1"].result.embedded == 36
    assert by["efficientnet_lite1"].dim == 1280 and by["efficientnet_lite1"].path != by["efficientnet_lite0"].path
    # the rate measured when the store was written is kept beside it
    assert by["efficientnet_lite0"].per_second is not None


def test_logme_of_a_real_store_equals_the_direct_implementation(swept):
    from test_logme import direct_logme

    from featurebank.classifiers.logme import logme

    feats = read_features(swept[2].stores[0].path)  # blocks.3: 40 dims
    train = feats.subset((feats.y >= 0) & (feats.splits == "train"))
    _, y = np.unique(train.y, return_inverse=True)
    assert abs(logme(train.X, y) - direct_logme(train.X, y)) <= 1e-3


@pytest.mark.parametrize("cache", ["usable", "a file"])
def test_decoding_workers_start_before_the_runtimes_and_again_when_the_runtime_takes_other_input(
        swept, tmp_path, monkeypatch, cache):
    """Two decoding workers start before the runtimes are built, decoding for the runtime expected
    (OpenVINO: uint8 pixels). When OpenVINO cannot serve (its model cache is a file), torch takes
    normalised tensors instead, and the workers start again: the same rows either way."""
    folder, _, first = swept
    said: list[str] = []
    if cache == "a file":
        (tmp_path / "cache-file").write_text("a file, not a folder")
        monkeypatch.setenv("FEATUREBANK_CACHE_DIR", str(tmp_path / "cache-file"))
    again = sweep(folder, ["efficientnet_lite0"], ["blocks.3", "final"], tmp_path / "store", workers=2,
                  progress=False, say=said.append)
    ran = [line for line in said if "in one forward pass" in line]
    assert len(ran) == 1 and ("(openvino f32" if cache == "usable" else "(torch") in ran[0], said
    for a, b in zip(again.stores, first.stores):
        assert a.path.name == b.path.name and a.result.embedded == a.result.rows == 36
        fa, fb = read_features(a.path), read_features(b.path)
        assert fa.ids == fb.ids
        assert cosines(fa.X, fb.X).min() >= 0.9999


def test_a_sweep_keeps_the_rows_it_cannot_see_and_the_labels_an_option_left_out(tmp_path):
    """Each sweep store is extract's in what it keeps: a shard that cannot be read keeps its rows (kept,
    not removed, and recorded as a failure), and a rerun without --label-column is refused before labels
    read from a column could be dropped; the store records its label column and its source."""
    import h5py
    from conftest import make_images, species_table

    from featurebank.data.demo import folder_items, write_webdataset
    from featurebank.data.sources import SourceError, open_source

    items, _ = folder_items(make_images(tmp_path / "pets"))
    shards = write_webdataset(items, tmp_path / "shards", shards=3)
    store, kw = tmp_path / "store", dict(workers=0, **QUIET)
    first = sweep(shards, ["efficientnet_lite0"], ["final"], store, **kw).stores[0]
    assert first.result.rows == len(items) == 6
    (shards / "shard-00001.tar").write_bytes(b"not a tar at all" * 40)
    partial = sweep(shards, ["efficientnet_lite0"], ["final"], store, **kw).stores[0].result
    assert (partial.removed, partial.kept, partial.rows) == (0, 2, 6), partial.summary()
    assert "cannot open as a tar" in dict(partial.failures)["shard-00001.tar"]

    table = species_table(items, tmp_path / "pets.parquet")
    labelled = sweep(open_source(table, label_column="species"), ["efficientnet_lite0"], ["final"], store, **kw)
    with h5py.File(labelled.stores[0].path, "r") as f:
        assert f.attrs["label_column"] == "species" and f.attrs["source_format"] == "parquet", dict(f.attrs)
    with pytest.raises(SourceError, match="give --label-column species again"):
        sweep(open_source(table), ["efficientnet_lite0"], ["final"], store, **kw)
    assert set(read_features(labelled.stores[0].path).class_names) == {"cat", "coffee"}


SWEEP = (
    "import sys\n"
    "from featurebank.features.sweep import sweep\n"
    "sweep(sys.argv[1], ['efficientnet_lite0'], ['blocks.3', 'final'], sys.argv[2], rows_per_part=4,\n"
    "      seconds_per_part=60, runtime='torch', batch_size=4, workers=0, progress=False)\n"
)


def test_a_killed_sweep_resumes(swept, tmp_path):
    folder, _, first = swept
    store = tmp_path / "store"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", SWEEP, str(folder), str(store)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while not any(store.glob("*.parts/part-*.h5")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list(store.glob("*.h5"))  # killed before any store was complete
    resumed = sweep(folder, ["efficientnet_lite0"], ["blocks.3", "final"], store, runtime="torch", **QUIET)
    assert sum(s.result.reused for s in resumed.stores) > 0  # the committed parts were kept
    assert all(s.result.rows == 36 and s.result.reused + s.result.embedded == 36 for s in resumed.stores)
    for a, b in zip(resumed.stores, first.stores):  # the same rows as the uninterrupted sweep (OpenVINO there)
        assert a.path.name == b.path.name
        fa, fb = read_features(a.path), read_features(b.path)
        assert fa.ids == fb.ids
        assert cosines(fa.X, fb.X).min() >= 0.9999


def test_ranking_flags_negative_transfer_where_the_baseline_wins(tmp_path):
    """A store whose embeddings carry no information about the labels (noise, written by the store's own
    writer) against the raw-pixel baseline on real digits: the baseline wins beyond the intervals."""
    from featurebank.classifiers.ranking import NEGATIVE, baseline_row, rank
    from featurebank.classifiers.train import pixel_baseline
    from featurebank.data.sources import escape_id, open_source, split_of
    from featurebank.features.pixels import pixel_features
    from featurebank.features.store import StoreConfig, StoreWriter

    folder = write_digits_folder(tmp_path / "digits", per_class=40, classes=(0, 1, 7))
    source = open_source(folder)
    ids = [escape_id(s.id) for s in source.samples]
    labels = [s.label for s in source.samples]
    splits = [split_of(s.id) for s in source.samples]
    content = source.fingerprints(False)
    bb = build_backbone("efficientnet_lite0")
    config = StoreConfig("noise", "none", bb.preprocessing.as_dict(), "pooled", "avg", "float32", 16)
    path = tmp_path / "noise.h5"
    with StoreWriter(path, config, "digits") as w:
        w.add(ids, np.random.default_rng(0).normal(size=(len(ids), 16)).astype(np.float32), content)
        w.finish(ids, labels, splits, content, class_names=source.classes)
    feats = read_features(path)
    test = (feats.y >= 0) & (feats.splits == "test")
    base = pixel_baseline(feats, pixel_features(source, feats.ids), say=lambda s: None)
    row = baseline_row("pixels", feats.y[test], base.y_pred)
    ranking = rank([{"backbone": "noise", "layer": "final", "store": str(path), "per_second": 1.0}], row,
                   say=lambda s: None)
    noise = ranking["rows"][0]
    assert noise["flag"] == NEGATIVE and noise["ci_high"] < row["ci_low"]
    assert ranking["rows"][-1]["baseline"] and ranking["rows"][-1]["flag"] is None


def test_sweep_cli_ranks_and_run_reuses_the_best_store(swept, tmp_path, capsys):
    from featurebank.pipelines.cli import main

    folder, store, _ = swept
    runs = tmp_path / "runs"
    assert main(["sweep", str(folder), "--backbones", "efficientnet_lite0", "--layers", "blocks.3,final",
                 "--store", str(store), "--out", str(runs)]) == 0
    out, err = capsys.readouterr()
    ranking = json.loads(out)
    rows = ranking["rows"]
    assert [r["backbone"] for r in rows][-1] == "pixels" and rows[-1]["baseline"]
    for r in rows:
        assert {"backbone", "layer", "store", "logme", "accuracy", "ci_low", "ci_high", "per_second", "flag"} <= set(r)
        assert r["ci_low"] <= r["accuracy"] <= r["ci_high"]
    assert "reused without a forward pass" in err and "best: " in err
    run_dir = next(d for d in runs.iterdir() if not d.name.startswith("."))
    for name in ("ranking.json", "ranking.md", "accuracy_vs_speed.png", "logme_vs_accuracy.png"):
        assert (run_dir / name).is_file()
    assert json.loads((run_dir / "ranking.json").read_text())["rows"] == rows
    best = ranking["best"]
    cmd = f"featurebank run {folder} --backbone {best['backbone']}"
    assert cmd in (run_dir / "ranking.md").read_text()
    layer = [] if best["layer"] == "final" else ["--layer", best["layer"]]
    # `run` embeds through the same stage as `extract` (pipelines.jobs.run_extract): the store is reused
    assert main(["extract", str(folder), "--backbone", best["backbone"], *layer, "--store", str(store)]) == 0
    out, err = capsys.readouterr()
    assert "up to date: 36 embeddings reused, no forward pass" in err and out.strip() == best["store"]


def test_compare_labels_runs_by_dataset_backbone_layer_precision_and_warns_on_mixed_datasets(tmp_path, capsys):
    from probes_support import digits_features

    from featurebank.classifiers.report import write_report
    from featurebank.classifiers.train import train_probes
    from featurebank.pipelines.cli import main

    f = digits_features(200)
    for name, layer in (("a", "blocks.5"), ("b", "pooled")):
        f.attrs = {"backbone": "efficientnet_lite0", "dataset": "digits", "layer": layer, "precision": "f32"}
        write_report(tmp_path / name, train_probes(f, ("ridge",), say=lambda *_: None), f)
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["layer"] == "blocks.5"
    (tmp_path / "c").mkdir()  # run b's report, of another dataset
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    (tmp_path / "c" / "metrics.json").write_text(json.dumps(metrics | {"dataset": "mnist"}))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out, err = capsys.readouterr()
    assert "| probe | digits/efficientnet_lite0/blocks.5/f32 acc |" in out and "digits/efficientnet_lite0/final/f32 acc" in out
    assert "different datasets" not in err
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "c")]) == 0
    out, err = capsys.readouterr()
    assert "mnist/efficientnet_lite0/final/f32 acc" in out
    assert "warning: these runs are of different datasets (digits, mnist)" in err


def test_one_read_and_one_decode_feed_every_backbone(tmp_path):
    """SharedDecoder reads each sample's bytes once and decodes once (at the largest backbone's needs);
    each backbone's tensor equals what its own decoder makes from the file, for a photo decoded in full
    and for a large one decoded at a reduced DCT scale."""
    import skimage.data
    from PIL import Image

    from featurebank.data.sources import FileReader
    from featurebank.features.backbones import Preprocessing
    from featurebank.features.decode import Decoder
    from featurebank.features.sweep import SharedDecoder

    class Counting(FileReader):
        reads = 0

        def read(self, loc):
            Counting.reads += 1
            return super().read(loc)

    small, large = tmp_path / "coffee.jpg", tmp_path / "large.jpg"
    Image.fromarray(skimage.data.coffee()).save(small, quality=90)
    Image.fromarray(skimage.data.coffee()).resize((2400, 1600)).save(large, quality=90)
    pres = [Preprocessing(224, 256, "bicubic", (0.5,) * 3, (0.5,) * 3),
            Preprocessing(260, 292, "bicubic", (0.5,) * 3, (0.5,) * 3),
            Preprocessing(240, 272, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    reader = Counting()
    shared = SharedDecoder([Decoder(pres[0], reader=reader).as_pixels(), Decoder(pres[1], reader=reader),
                            Decoder(pres[2], reader=reader)])
    for path in (small, large):
        Counting.reads = 0
        got = shared(str(path))
        assert Counting.reads == 1
        own = [Decoder(pres[0]).as_pixels()(str(path)), Decoder(pres[1])(str(path)), Decoder(pres[2])(str(path))]
        assert [tuple(t.shape) for t in got] == [(224, 224, 3), (3, 260, 260), (3, 240, 240)]
        for a, b in zip(got, own):
            a, b = a.float().flatten(), b.float().flatten()
            if path == small:
                assert torch_equal(a, b)  # the same pixels, the same resize: identical
            else:  # decoded at the scale the largest backbone needs: 1/2 for all three here
                assert float((a @ b) / (a.norm() * b.norm())) > 0.9999


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_sweep_flow_posts_the_ranking_as_artifacts(swept, tmp_path, prefect_api):
    """As a Prefect flow (on the session's server): the same ranking, and the markdown and table artifacts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from featurebank.pipelines.flows import sweep_flow
    from featurebank.pipelines.params import SweepParams

    folder, store, _ = swept
    params = SweepParams(source=str(folder), backbones=["efficientnet_lite0"], layers=["final"], store_dir=str(store),
                         out_dir=str(tmp_path / "runs"), pixel_baseline=False)
    state = sweep_flow(params, return_state=True)
    assert state.is_completed()
    out = state.result()
    assert [r["layer"] for r in out["ranking"]["rows"]] == ["final"] and Path(out["json"]).is_file()
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
        keys = {a.key: a.data for a in found}
    assert "featurebank-sweep" in keys and "| efficientnet_lite0 | final |" in keys["featurebank-sweep"]
    assert "featurebank-sweep-rows" in keys


def test_text_sweep_makes_extracts_store_and_ranks_against_tfidf(tmp_path, capsys):
    """Texts: the sweep's MiniLM store is the file `extract` makes (reused by it), ranked beside TF-IDF."""
    from test_text import bbc_articles

    from featurebank.pipelines.cli import main

    arts = [a for a in bbc_articles() if a[0] in ("business", "sports", "tech")]
    root = tmp_path / "news"
    for topic in ("business", "sports", "tech"):
        (root / topic).mkdir(parents=True)
        for _, name, data in [a for a in arts if a[0] == topic][:20]:
            (root / topic / name).write_bytes(data[:600])
    store = tmp_path / "store"
    assert main(["sweep", str(root), "--backbones", "minilm", "--store", str(store), "--out", str(tmp_path / "runs")]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)["rows"]
    assert [(r["backbone"], r["layer"]) for r in rows] == [("minilm", "final"), ("tfidf", None)]
    assert rows[0]["per_second"] > 0 and rows[0]["dim"] == 384 and rows[1]["store"] is None
    again = extract(root, build_backbone("minilm"), store, **QUIET)
    assert str(again.path) == rows[0]["store"] and again.embedded == 0 and again.reused == 60
    assert main(["sweep", str(root), "--backbones", "minilm", "--layers", "blocks.1", "--store", str(store)]) == 1
    assert "--layers applies to image backbones only" in capsys.readouterr().err


def test_allow_damaged_notes_damaged_jpegs_in_every_store_as_extract_does(tmp_path):
    """Three whole JPEGs and three damaged copies (conftest's real damage, as test_integrity_damage uses): with
    allow_damaged the shared decode embeds them and every store notes them "damaged", the store extract
    makes (reused by it); without it they are failures with libjpeg's reason; with it again they are
    tried again, as extract does."""
    import h5py

    from featurebank.features.images import DAMAGED
    from featurebank.features.store import strings

    root = write_damaged_folder(tmp_path / "photos")
    store, kw = tmp_path / "store", dict(workers=0, **QUIET)
    layers = ["blocks.3", "final"]
    r = sweep(root, ["efficientnet_lite0"], layers, store, allow_damaged=True, **kw)
    for s in r.stores:
        assert (s.result.embedded, s.result.failed, s.result.notes) == (6, 0, {"damaged": 3})
        with h5py.File(s.path, "r") as f:
            notes = dict(zip(strings(f["ids"]), strings(f["notes"])))
        assert {i for i, n in notes.items() if n == "damaged"} == {"b/inverted.jpg", "b/zeroed.jpg", "b/half.jpg"}
    single = extract(root, build_backbone("efficientnet_lite0", layer="blocks.3"), store, allow_damaged=True, **kw)
    assert single.path == r.stores[0].path and (single.embedded, single.reused) == (0, 6)
    strict = sweep(root, ["efficientnet_lite0"], layers, store, **kw)
    for s in strict.stores:
        assert (s.result.embedded, s.result.reused, s.result.failed, s.result.rows) == (0, 3, 3, 3)
        assert all(reason.startswith(DAMAGED) for _, reason in s.result.failures)
    back = sweep(root, ["efficientnet_lite0"], layers, store, allow_damaged=True, **kw)
    assert all((s.result.embedded, s.result.reused, s.result.notes) == (3, 3, {"damaged": 3}) for s in back.stores)


def _photo_jpegs(folder: Path) -> list[Path]:
    """Real photos as JPEGs of several sizes, one of them large enough for a reduced DCT scale, and a
    broken one (cut short)."""
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (name, size) in enumerate((("coffee", (400, 300)), ("chelsea", (451, 300)), ("astronaut", (1200, 1200)))):
        p = folder / f"{k}.jpg"
        Image.fromarray(getattr(skimage.data, name)()).resize(size).save(p, quality=90)
        paths.append(p)
    broken = folder / "broken.jpg"
    broken.write_bytes(paths[0].read_bytes()[:300])
    return [*paths, broken]


def _preprocessings():
    from featurebank.features.backbones import Preprocessing

    return [Preprocessing(224, 256, "bicubic", (0.5,) * 3, (0.5,) * 3),
            Preprocessing(260, 292, "bicubic", (0.5,) * 3, (0.5,) * 3),
            Preprocessing(240, 272, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]


def test_one_device_decode_feeds_every_backbone_as_the_single_gpu_path_does(tmp_path):
    """The sweep's GPU path, with the CPU as the device: a batch of JPEGs decoded once
    (SharedDecoder.finish_on_device), each backbone's resize and normalisation from that one decoded
    tensor; every backbone's tensors equal the single extraction's GPU path (decode_on_device with its
    own decoder) exactly, and the broken file fails in both with the same reason."""
    import torch

    from featurebank.features.decode import Decoder, decode_on_device
    from featurebank.features.sweep import SharedDecoder

    paths = [str(p) for p in _photo_jpegs(tmp_path / "photos")]
    jpegs = [torch.frombuffer(bytearray(Path(p).read_bytes()), dtype=torch.uint8) for p in paths]
    shared = SharedDecoder([Decoder(pre) for pre in _preprocessings()])
    cpu = torch.device("cpu")
    got, fails, notes = shared.finish_on_device(jpegs, paths, cpu)
    assert [k for k, _ in fails] == [3] and got[3] is None and notes == []
    for a, pre in enumerate(_preprocessings()):
        own, own_fails = decode_on_device(jpegs, paths, Decoder(pre), cpu)
        assert own_fails == fails
        for k in range(3):
            assert got[k][a].shape == (3, pre.size, pre.size) and torch.equal(got[k][a], own[k])


def test_the_sweeps_gpu_path_runs_on_the_cpu_and_makes_the_single_paths_stores(tmp_path):
    """The whole device path of the sweep (a loader worker sending JPEG bytes, one decode per batch on
    the device, each backbone finished there, the CPU fallback for PNGs and broken files, the writer
    thread), with the CPU as the device: its stores are the files a single extraction's GPU path (run on
    the CPU the same way) makes, with the same rows."""
    from conftest import make_images

    from featurebank.features.device import Layout

    folder = make_images(tmp_path / "photos")  # JPEGs and PNGs
    (folder / "cat" / "broken.jpg").write_bytes((folder / "cat" / "01.jpg").read_bytes()[:200])
    lay = Layout("cpu", replicas=0, threads=2, loader_workers=0, gpu_decode=True)  # extract's way, below
    r = sweep(folder, ["efficientnet_lite0"], ["blocks.3", "final"], tmp_path / "store", device="cpu",
              runtime="torch", workers=1, batch_size=4, layout=lay, **QUIET)
    assert r.stages.get("decode (device)", 0) > 0
    for s, layer in zip(r.stores, ("blocks.3", None)):
        assert (s.result.embedded, s.result.failed) == (6, 1)
        single = extract(folder, build_backbone("efficientnet_lite0", layer=layer), tmp_path / "single", device="cpu",
                         batch_size=4, layout=lay, **QUIET)
        assert single.path.name == s.path.name and single.failed == 1
        a, b = read_features(s.path), read_features(single.path)
        assert a.ids == b.ids and len(a.ids) == 6
        assert cosines(a.X, b.X).min() >= 0.9999


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", ["fp32", "auto"])
def test_the_sweep_on_cuda_decodes_on_the_device_and_makes_extracts_stores(tmp_path, amp):
    """On CUDA: JPEGs decoded once on the GPU feed two backbones of different input sizes; each store is
    the file extract makes on CUDA at the same precision, with the same rows."""
    folder = write_digits_folder(tmp_path / "digits", per_class=8, classes=(0, 1, 7))
    for p in list(folder.rglob("*.png"))[::2]:  # half of them JPEGs: decoded on the device
        from PIL import Image

        Image.open(p).convert("RGB").save(p.with_suffix(".jpg"), quality=95)
        p.unlink()
    names = ["efficientnet_lite0", "efficientnet_lite1"]
    r = sweep(folder, names, ["final"], tmp_path / "store", device="cuda", amp=amp, **QUIET)
    assert r.stages.get("decode (device)", 0) > 0
    tol = 0.9999 if amp == "fp32" else 0.999
    for s, name in zip(r.stores, names):
        single = extract(folder, build_backbone(name), tmp_path / "single", device="cuda", amp=amp, **QUIET)
        assert single.path.name == s.path.name
        a, b = read_features(s.path), read_features(single.path)
        assert a.ids == b.ids and len(a.ids) == 24
        assert cosines(a.X, b.X).min() >= tol


def test_the_backbones_take_turns_in_the_order_the_batches_were_handed_out():
    """The CPU path's lanes (one thread per backbone): each batch runs when its turn comes, in hand-over
    order, and an error in one lane stops the others and reaches the caller. The lanes' scheduling alone,
    with runtimes that record when they run: one synchronous (torch-like, ``embed``) and two pipelined
    (OpenVINO-like, ``map`` pulling the next batch only after handing over the last)."""
    import threading

    from featurebank.features.sweep import _Lanes

    log, lock = [], threading.Lock()

    class Recording:
        def __init__(self, a, pipelined):
            self.a, self.pipelined, self.busy = a, pipelined, False

        def _run(self, x):
            with lock:
                assert not any(r.busy for r in rts), "two backbones ran at once"
                self.busy = True
            time.sleep(0.002 * (3 - self.a))  # the first lane is the slowest: turns, not speed, decide
            log.append((self.a, int(x[0])))
            self.busy = False
            return np.zeros((len(x), 2), np.float32)

        def embed(self, x):
            return self._run(x)

        def map(self, batches):
            for tag, x in batches:
                yield tag, self._run(x)

    rts = [Recording(0, False), Recording(1, True), Recording(2, True)]

    class Run:
        active, runtimes = [None] * 3, rts

        def rows(self, a, ks, emb, notes):
            pass

    lanes = _Lanes(Run())
    try:
        for batch in range(6):
            for a in range(3):
                if (a, batch) != (2, 3):  # a backbone that needs none of a batch's samples is not handed it
                    lanes.hand(a, ((np.arange(2), None), np.full(2, batch)))
        lanes.finish()
    finally:
        lanes.close()
    handed = [(a, b) for b in range(6) for a in range(3) if (a, b) != (2, 3)]
    assert log == handed

    class Failing(Recording):
        def embed(self, x):
            raise RuntimeError("out of memory in backbone 0")

    rts[0] = Failing(0, False)
    lanes = _Lanes(Run())
    with pytest.raises(RuntimeError, match="backbone 0"):
        try:
            for batch in range(50):
                for a in range(3):
                    lanes.hand(a, ((np.arange(2), None), np.full(2, batch)))
            lanes.finish()
        finally:
            lanes.close()
