"""Decode benchmark: images/s of the engine's decoders in one process on one thread.

    python benchmarks/decode.py                    # 200 generated 500x375 JPEGs, best of 5 passes
    python benchmarks/decode.py --images 500 --repeat 7

For each decoder (fast to uint8 pixels, as the OpenVINO runtime is fed; fast to normalised floats;
plain: PIL and the backbone's reference transform) it decodes every file ``--repeat`` times and prints
the best pass and the median in images/s. The JPEGs are the extraction benchmark's (crops of
scikit-image's sample photos, quality 90). It is meant for before/after comparisons of a change to
``features.decode`` or ``features.images`` on the same machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from checkout import use_checkout  # noqa: E402

use_checkout()

import torch  # noqa: E402
from extraction import make_images  # noqa: E402

from featurebank.features.backbones import create_backbone  # noqa: E402
from featurebank.features.decode import Decoder  # noqa: E402


def passes(dec: Decoder, files: list[str], repeat: int) -> list[float]:
    rates = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for p in files:
            dec(p)
        rates.append(len(files) / (time.perf_counter() - t0))
    return rates


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--data", help="a folder of JPEGs (default: generated)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    pre = create_backbone().preprocessing
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(a.data) if a.data else make_images(Path(tmp) / "jpegs", a.images, (500, 375))
        files = sorted(str(p) for p in folder.rglob("*.jpg"))[:a.images]
        out = {}
        for name, dec in (("fast, pixels", Decoder(pre, "fast", pixels=True)), ("fast, floats", Decoder(pre, "fast")),
                          ("plain", Decoder(pre, "plain"))):
            dec(files[0])  # warm
            rates = passes(dec, files, a.repeat)
            out[name] = {"best": max(rates), "median": statistics.median(rates)}
            print(f"{name:>13}: best {max(rates):7.1f} images/s, median {statistics.median(rates):7.1f} "
                  f"({len(files)} JPEGs x {a.repeat})", flush=True)
    return out


if __name__ == "__main__":
    main()
