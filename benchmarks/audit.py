"""Measure the audit (docs/audit.md) on the MNIST-5k demo store.

    featurebank demo mnist5k --store bench-store --data-dir bench-data --no-prefect   # once: the store and images
    python benchmarks/audit.py labels --store bench-store/mnist5k-<fingerprint>.h5 --images bench-data/mnist5k --seeds 0,1,2
    python benchmarks/audit.py duplicates --store bench-store/mnist5k-<fp>.h5 --images bench-data/mnist5k
    python benchmarks/audit.py drift --store bench-store/mnist5k-<fp>.h5 --work bench-work
    python benchmarks/audit.py cost --store bench-store/mnist5k-<fp>.h5 --images bench-data/mnist5k --rows 0,100000

- labels: 5 % of the labels flipped at random to another class (in memory, seeded), the label audit run,
  precision among the top k (k = number flipped) and recall among all flagged, per seed (without ``--images``:
  the embeddings' probes alone, as for a store whose pictures cannot be read; ``--probes logreg``:
  the logistic probe's probabilities alone, for comparison; ``--filter-by``: another of cleanlab's rules for
  what is flagged; any store, e.g. Fashion-MNIST's).
- duplicates: 20 images re-saved under new names as JPEG (other quality; ``--resize`` changes the size
  too), embedded into a copy of the store (only the 20 new files are embedded), the audit's
  near-duplicate groups scored: how many copies land in a group with their original, and how many other
  groups are flagged among the originals.
- drift: the store's rows split into a reference of 1,000 and 20 disjoint batches of 200 (same dataset:
  false positives at p < 0.01), and 20 batches of 140 MNIST + 60 Fashion-MNIST (30 %; Fashion-MNIST
  embedded by the same backbone into ``--work``).
- cost: the whole store audit (label issues, duplicates, leaks) timed with its peak memory traced by
  tracemalloc beyond the embeddings already read (the libraries imported first); rows
  above the store's are made by repeating its embeddings with Gaussian noise (sd 0.05 of each row's
  norm / sqrt(dim)), written through the store's writer.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

try:
    import featurebank  # noqa: F401
except ImportError:  # a checkout without an install: the repository root is the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from featurebank.classifiers.audit import (
    FILTER_BY, audit_features, find_label_issues, groups_of, near_duplicate_pairs, near_duplicates, picture_neighbours,
    pixel_fingerprints, store_source,
)
from featurebank.classifiers.drift import domain_classifier_test
from featurebank.data.sources import open_source
from featurebank.features.store import read_features


def cli(*args: str) -> str:
    exe = Path(sys.executable).with_name("featurebank")
    out = subprocess.run([str(exe), *args], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def labels(args) -> list[dict]:
    f = read_features(args.store)
    pictures = pixel_fingerprints(open_source(args.images), f.ids) if args.images else None
    pixel_nb = picture_neighbours(pictures[1]) if pictures is not None else None
    rows = []
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        y = f.y.copy()
        k = int(round(args.fraction * len(y)))
        flip = rng.choice(len(y), k, replace=False)
        y[flip] = (y[flip] + rng.integers(1, len(f.class_names), k)) % len(f.class_names)
        t = time.perf_counter()
        found = find_label_issues(f.X, y, folds=args.folds, seed=seed, knn=args.probes == "logreg+knn",
                                  filter_by=args.filter_by, pictures=pictures, pixel_neighbours=pixel_nb)
        flagged = found["rows"].tolist()
        flipped = set(flip.tolist())
        row = {"seed": seed, "flipped": k, "flagged": len(flagged),
               "precision_top_k": round(len(flipped & set(flagged[:k])) / k, 4),
               "recall_flagged": round(len(flipped & set(flagged)) / k, 4),
               "precision_flagged": round(len(flipped & set(flagged)) / max(len(flagged), 1), 4),
               "C": found["probe"]["C"], "probes": args.probes, "folds": args.folds, "filter_by": args.filter_by,
               "pictures": found["probe"]["pictures"], "members_accuracy": found["probe"]["members_accuracy"],
               "seconds": round(time.perf_counter() - t, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def duplicates(args) -> dict:
    images = Path(args.images)
    work = Path(args.work)
    folder = work / "dups" / images.name
    if folder.exists():
        shutil.rmtree(folder)
    from PIL import Image

    files = sorted(p for p in images.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    for p in files:  # the originals, as links (same bytes, same modification time: reused from the store)
        target = folder / p.relative_to(images)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(p, target)
    rng = random.Random(args.seed)
    copies = {}
    for k, p in enumerate(rng.sample(files, 20)):
        img = Image.open(p).convert("RGB")
        if args.resize:
            f = rng.choice([0.93, 1.07])
            img = img.resize((round(img.width * f), round(img.height * f)), Image.BICUBIC)
        name = f"resaved{k:02d}_{p.stem}.jpg"
        img.save(folder / p.parent.relative_to(images) / name, quality=rng.choice(args.quality))
        copies[str((p.parent.relative_to(images) / name).as_posix())] = str(p.relative_to(images).as_posix())
    store_dir = work / "dups-store"
    store_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(args.store, store_dir / Path(args.store).name)  # only the 20 new files are embedded
    path = cli("extract", str(folder), "--store", str(store_dir), "--dataset", Path(args.store).name.split("-")[0])
    f = read_features(path)
    t = time.perf_counter()
    pictures = pixel_fingerprints(open_source(folder), f.ids)  # what the audit reads through the store's source
    pairs, how = near_duplicates(f.X, pictures)
    seconds = time.perf_counter() - t
    pos = {i: k for k, i in enumerate(f.ids)}
    copy_rows = {pos[c] for c in copies if c in pos}
    out = {"copies": len(copies), "n": len(f.ids), "resize": args.resize, "quality": args.quality,
           "rows_with_picture": how["rows_with_picture"], "seconds": round(seconds, 2)}
    for name, found_pairs in (("pictures", list(pairs)), ("embeddings_only", near_duplicate_pairs(f.X))):
        groups = groups_of(len(f.ids), found_pairs)
        group_of = {m: g for g, members in enumerate(groups) for m in members}
        others = [g for g in groups if not copy_rows & set(g)]
        sim = {(a, b): v for (a, b), v in pairs.items()}
        out[name] = {
            "found_with_original": sum(1 for c, o in copies.items()
                                       if c in pos and group_of.get(pos[c], -1) == group_of.get(pos[o], -2)),
            "copy_group_sizes": sorted(len(g) for g in groups if copy_rows & set(g)),
            "other_groups": len(others), "other_samples": sum(len(g) for g in others),
            "sample_other_groups": [[f.ids[m] for m in g] + ([round(sim[(g[0], g[1])][1] or 0, 4)] if (g[0], g[1]) in sim
                                                             else []) for g in others[:12]]}
    print(json.dumps(out, indent=1), flush=True)
    return out


def drift(args) -> dict:
    f = read_features(args.store)
    work = Path(args.work)
    fashion_store = work / "fashion-store"
    if not fashion_store.is_dir() or not list(fashion_store.glob("*.h5")):
        from featurebank.data.demo import fashion_mnist

        folder = fashion_mnist(work / "fashion-data", size=args.fashion)
        cli("extract", str(folder), "--store", str(fashion_store))
    fashion = read_features(next(fashion_store.glob("*.h5")))
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(f.ids))
    reference = f.X[order[:1000]]
    same, mixed = [], []
    for b in range(20):
        batch = order[1000 + 200 * b:1000 + 200 * (b + 1)]
        same.append(domain_classifier_test(reference, f.X[batch], seed=b))
        mnist = f.X[batch[:140]]
        other = fashion.X[rng.choice(len(fashion.ids), 60, replace=False)]
        mixed.append(domain_classifier_test(reference, np.vstack([mnist, other]), seed=b))
    out = {"same_flagged": sum(r["drifted"] for r in same), "same_batches": len(same),
           "same_p_values": [round(r["p_value"], 4) for r in same],
           "same_auc": [r["statistic"] for r in same],
           "mixed_flagged": sum(r["drifted"] for r in mixed), "mixed_batches": len(mixed),
           "mixed_max_p": max(r["p_value"] for r in mixed), "mixed_auc": [r["statistic"] for r in mixed],
           "seconds_per_test": round(float(np.mean([r["seconds"] for r in same + mixed])), 2)}
    print(json.dumps(out), flush=True)
    return out


def synthetic_store(base: str, rows: int, work: Path) -> Path:
    from featurebank.features.store import StoreConfig, StoreWriter

    f = read_features(base)
    cfg = json.loads(f.attrs["config"])
    config = StoreConfig(**{k: cfg[k] for k in ("backbone", "weights_sha256", "preprocessing", "layer", "pooling",
                                                  "dtype", "dim")})
    path = work / f"synthetic-{rows}.h5"
    if path.exists():
        return path
    rng = np.random.default_rng(0)
    names = f.class_names
    ids, labels, splits, content = [], [], [], []
    with StoreWriter(path, config, f"synthetic-{rows}", rows_per_part=20_000) as w:
        for start in range(0, rows, 5000):
            pick = rng.integers(0, len(f.ids), min(5000, rows - start))
            X = f.X[pick]
            noise = rng.normal(0, 0.05, X.shape).astype(np.float32)
            X = X + noise * np.linalg.norm(X, axis=1, keepdims=True) / np.sqrt(X.shape[1])
            batch = [f"s{start + k:07d}" for k in range(len(pick))]
            w.add(batch, X, [f"stat:{start + k}:0" for k in range(len(pick))])
            ids += batch
            labels += [names[f.y[i]] for i in pick]
            splits += [str(f.splits[i]) for i in pick]
            content += [f"stat:{start + k}:0" for k in range(len(pick))]
        w.finish(ids, labels, splits, content, say=lambda s: None, class_names=names)
    return path


def cost(args) -> list[dict]:
    out = []
    for rows in args.rows:
        path = args.store if rows == 0 else synthetic_store(args.store, rows, Path(args.work))
        f = read_features(path)
        emb_mb = f.X.nbytes / 2**20
        import cleanlab.filter  # noqa: F401 - modules loaded before tracing: their import is not the audit's data
        import scipy.stats  # noqa: F401
        import sklearn.decomposition  # noqa: F401
        import sklearn.linear_model  # noqa: F401
        import sklearn.model_selection  # noqa: F401

        def audit_store(f=f, rows=rows):  # as 'featurebank audit' does: the pictures of the source recorded in the store
            source, note = store_source(f, args.images if rows == 0 else None)  # --images: as --source does
            return audit_features(f, source=source, source_note=note, say=lambda s: print(s, file=sys.stderr))

        untraced = None
        if len(f.ids) <= args.untraced_rows:  # tracing slows Python's allocations: time a run without it too
            t = time.perf_counter()
            audit_store()
            untraced = round(time.perf_counter() - t, 1)
        tracemalloc.start()
        t = time.perf_counter()
        audit = audit_store()
        seconds = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        row = {"rows": len(f.ids), "embeddings_mb": round(emb_mb, 1), "seconds_untraced": untraced,
               "seconds": round(seconds, 1),
               "parts": audit["seconds"], "near_duplicates_by": audit["near_duplicates"]["method"],
               "near_duplicate_groups": audit["near_duplicates"]["n_groups"],
               "peak_traced_mb": round(peak, 1), "peak_over_embeddings": round(peak / emb_mb, 2)}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["labels", "duplicates", "drift", "cost"])
    ap.add_argument("--store", required=True, help="the MNIST-5k demo store (featurebank demo mnist5k)")
    ap.add_argument("--images", help="duplicates: the demo's image folder; labels: the store's pictures (the audit "
                    "reads them through the store's source), for the picture member")
    ap.add_argument("--work", default="bench-audit", help="scratch folder")
    ap.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--seed", default=0, type=int)
    ap.add_argument("--fraction", default=0.05, type=float, help="labels: fraction flipped")
    ap.add_argument("--probes", default="logreg+knn", choices=["logreg+knn", "logreg"],
                    help="labels: whose out-of-fold probabilities (the audit's: logreg+knn)")
    ap.add_argument("--folds", default=5, type=int, help="labels: cross-validation folds")
    ap.add_argument("--filter-by", default=FILTER_BY,
                    choices=["prune_by_class", "prune_by_noise_rate", "both", "confident_learning", "predicted_neq_given"],
                    help="labels: cleanlab's rule for what is flagged (the audit's: %(default)s)")
    ap.add_argument("--resize", action="store_true", help="duplicates: also change the size by 7 %%")
    ap.add_argument("--quality", default="75,85,95", type=lambda s: [int(x) for x in s.split(",")],
                    help="duplicates: JPEG qualities drawn from")
    ap.add_argument("--fashion", default=600, type=int, help="drift: Fashion-MNIST images embedded")
    ap.add_argument("--untraced-rows", default=20_000, type=int,
                    help="cost: stores up to this size are also timed without tracemalloc")
    ap.add_argument("--rows", default="0", type=lambda s: [int(x) for x in s.split(",")],
                    help="cost: 0 = the store itself; more = synthetic rows")
    args = ap.parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    {"labels": labels, "duplicates": duplicates, "drift": drift, "cost": cost}[args.what](args)


if __name__ == "__main__":
    main()
