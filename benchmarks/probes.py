"""Measure the probe suite on a store: the CLIP search's cost, an independent check of the CLIP
protocol, and the out-of-core probe's accuracy gap and memory. Prints one JSON object.

    python benchmarks/probes.py STORE [--budget-mb 8] [--loaded [--unlimited]]

``--loaded`` adds the loaded-machine case: the logreg probe's fit as ``train`` runs it (thread pools sized
by featurebank.classifiers.threads), alone and then with two busy processes (one spinning core each) beside
it, printed with their ratio (the goal: at most 2); ``--unlimited`` also times the loaded fit with the
libraries' default thread pools (one thread per core), as before they were sized.

The out-of-core fit runs in a child process, so its baseline (after imports) and peak are its own:
tracemalloc's peak (Python and numpy allocations) and the RSS high-water mark minus the RSS after imports.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

CHILD = r"""
import json, sys, time, tracemalloc
import h5py, numpy as np, scipy.optimize, sklearn.linear_model
from featurebank.classifiers.outofcore import OutOfCoreLogisticProbe
path, budget = sys.argv[1], float(sys.argv[2])
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
rss0 = status("VmRSS")
tracemalloc.start()
t = time.perf_counter()
probe = OutOfCoreLogisticProbe(memory_budget_mb=budget).fit_store(path)
seconds = time.perf_counter() - t
_, peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
rss1 = status("VmHWM")  # high-water mark: an upper bound on the fit's peak (imports may have set it)
with h5py.File(path, "r") as f:
    labels = f["labels"][()]
    splits = np.array([s.decode() if isinstance(s, bytes) else s for s in f["splits"][()]])
test = np.flatnonzero((labels >= 0) & (splits == "test"))
pred = probe.classes_[np.argmax(probe.predict_proba_store(path, test), axis=1)]
print(json.dumps({"accuracy": float(np.mean(pred == labels[test])), "C": probe.C_, "fit_seconds": seconds,
                  "search_iterations": probe.search_iterations_, "block_rows": probe.block_rows_,
                  "tracemalloc_peak_mb": peak / 2**20, "rss_peak_above_baseline_mb": (rss1 - rss0) / 2**20}))
"""


def independent_clip(Xtr, ytr, Xte, yte):
    """The documented protocol written again with plain scikit-learn, every fit cold, and the whole
    coarse grid 10^-6 .. 10^6 evaluated (no early stop)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(Xtr)
    Xs = scaler.transform(Xtr)
    a, b, ya, yb = train_test_split(Xs, ytr, test_size=int(np.ceil(0.2 * len(ytr))), random_state=0, stratify=ytr)
    score = {}
    acc = lambda C: score.setdefault(C, LogisticRegression(C=C, max_iter=1000).fit(a, ya).score(b, yb))
    grid = [10.0 ** k for k in range(-6, 7)]
    best = min(grid, key=lambda c: (-acc(c), c))
    log_c, half = np.log10(best), 1.0
    for _ in range(3):
        half /= 2
        cands = [10 ** (log_c - half), 10 ** log_c, 10 ** (log_c + half)]
        best = min(cands, key=lambda c: (-acc(c), c))
        log_c = np.log10(best)
    model = LogisticRegression(C=best, max_iter=1000).fit(Xs, ytr)
    return best, float(model.score(scaler.transform(Xte), yte)), {float(c): v for c, v in sorted(score.items())}


BUSY = "while True: pass"


CPU_SECONDS: list[float] = []  # the process's CPU time of each timed fit (all its threads), in order


def timed_fit(X, y, sized: bool = True) -> tuple[float, float, object, int | None]:
    """(wall seconds, chosen C, the fitted probe, threads used or None) of one CLIP probe fit; its CPU
    seconds go to CPU_SECONDS."""
    from featurebank.classifiers.probes import CLIPLogisticProbe
    from featurebank.classifiers.threads import sized_threads

    t, cpu = time.perf_counter(), time.process_time()
    if sized:
        with sized_threads(*X.shape) as threads:
            probe = CLIPLogisticProbe().fit(X, y)
    else:
        threads = None
        probe = CLIPLogisticProbe().fit(X, y)
    CPU_SECONDS.append(time.process_time() - cpu)
    return time.perf_counter() - t, float(probe.C_), probe, threads


def loaded_machine(tr, te, unlimited: bool = False) -> dict:
    """The logreg fit alone, then beside two busy processes; their ratio."""
    quiet, c_quiet, probe, threads = timed_fit(tr.X, tr.y)
    out = {"threads": threads, "quiet_seconds": quiet, "quiet_C": c_quiet, "quiet_accuracy": float(probe.score(te.X, te.y))}
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(2)]
    try:
        time.sleep(1.0)  # let them take their cores
        loaded, c_loaded, probe, _ = timed_fit(tr.X, tr.y)
        out |= {"loaded_seconds": loaded, "loaded_C": c_loaded, "loaded_accuracy": float(probe.score(te.X, te.y)),
                "ratio": loaded / quiet}
        if unlimited:
            free, c_free, probe, _ = timed_fit(tr.X, tr.y, sized=False)
            out |= {"loaded_default_threads_seconds": free, "loaded_default_threads_C": c_free,
                    "loaded_default_threads_accuracy": float(probe.score(te.X, te.y))}
    finally:
        for p in busy:
            p.kill()
            p.wait()
    out["cpu_seconds"] = CPU_SECONDS[-3:] if unlimited else CPU_SECONDS[-2:]  # quiet, loaded[, default pools]
    try:
        out["load_average_after"] = os.getloadavg()[0]
    except OSError:
        pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("--budget-mb", type=float, default=8.0)
    ap.add_argument("--loaded", action="store_true", help="add the loaded-machine case (two busy processes beside the fit)")
    ap.add_argument("--unlimited", action="store_true", help="with --loaded: also the fit with default thread pools")
    ap.add_argument("--loaded-only", action="store_true", help="only the loaded-machine case")
    args = ap.parse_args()
    from featurebank.classifiers.probes import CLIPLogisticProbe
    from featurebank.features.store import read_features

    f = read_features(args.store)
    lab = f.subset(f.y >= 0)
    tr, te = lab.train, lab.test
    out = {"store": args.store, "n_train": len(tr.y), "n_test": len(te.y), "dim": int(f.X.shape[1]),
           "features_mb": f.X.nbytes / 2**20}
    if args.loaded or args.loaded_only:
        out["loaded_machine"] = loaded_machine(tr, te, args.unlimited)
        if args.loaded_only:
            print(json.dumps(out, indent=1))
            return
    t = time.perf_counter()
    probe = CLIPLogisticProbe(measure_cold_fit=True).fit(tr.X, tr.y)
    out["clip"] = {"C": probe.C_, "accuracy": float(probe.score(te.X, te.y)), "seconds_with_cold_fit": time.perf_counter() - t,
                   "fits": len(probe.search_path_) + 1, "search_iterations": probe.search_iterations_,
                   "cold_fit_iterations": probe.cold_fit_iterations_,
                   "ratio": probe.search_iterations_ / probe.cold_fit_iterations_,
                   "path": [(float(c), it, s) for c, it, s in probe.search_path_]}
    t = time.perf_counter()
    C, acc, scores = independent_clip(tr.X, tr.y, te.X, te.y)
    out["independent"] = {"C": float(C), "accuracy": acc, "seconds": time.perf_counter() - t, "validation": scores}
    out["clip"]["gap_to_independent_points"] = 100 * (out["clip"]["accuracy"] - acc)
    child = subprocess.run([sys.executable, "-c", CHILD, args.store, str(args.budget_mb)], capture_output=True,
                           text=True, check=True)
    out["out_of_core"] = json.loads(child.stdout.strip().splitlines()[-1]) | {"budget_mb": args.budget_mb}
    out["out_of_core"]["gap_points"] = 100 * (out["clip"]["accuracy"] - out["out_of_core"]["accuracy"])
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
