"""--config reads only a small regular UTF-8 file: a FIFO, /dev/zero, a huge file or a non-UTF-8 file are
each one line, at once (a FIFO blocked forever, /dev/zero grew to 7.7 GB, Latin-1 was a traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
from featurebank.pipelines.cli import main
for config in sys.argv[2:]:
    t = time.perf_counter()
    code = main(["extract", sys.argv[1], "--config", config])
    print(json.dumps([code, round(time.perf_counter() - t, 2)]), flush=True)
    print("--", file=sys.stderr, flush=True)
"""

CASES = {
    "latin1": "is not UTF-8 text",
    "fifo": "is a FIFO, not a regular file",
    "dev-zero": "is a character device, not a regular file",
    "huge": "more than the 1,048,576 allowed",
    "folder": "is a folder, not a regular file",
}


def test_a_config_that_is_not_a_small_utf8_file_is_one_line_at_once(tmp_path, digits_folder):
    """Each case in one child process (one interpreter start for all): exit 2, one line naming the file and
    what is wrong, well under 5 s each, no store created."""
    configs = []
    for kind in CASES:
        config = tmp_path / f"{kind}.toml"
        if kind == "latin1":
            config.write_bytes('dataset = "caf\u00e9"\n'.encode("latin-1"))
        elif kind == "fifo":
            os.mkfifo(config)  # nothing ever writes: open() blocks for good unless it does not wait
        elif kind == "dev-zero":
            config = Path("/dev/zero")
        elif kind == "huge":
            with open(config, "wb") as f:
                f.truncate(3 << 30)  # 3 GiB (sparse): never read into memory
        else:
            config.mkdir()
        configs.append(str(config))
    t = time.monotonic()
    out = subprocess.run([sys.executable, "-c", CHILD, str(digits_folder), *configs], capture_output=True, text=True,
                         timeout=120)
    results = [json.loads(line) for line in out.stdout.splitlines()]
    errors = out.stderr.split("--\n")
    assert len(results) == len(CASES), out.stderr
    for (kind, expected), config, (code, seconds), err in zip(CASES.items(), configs, results, errors):
        assert code == 2 and len(err.strip().splitlines()) == 1, (kind, err)
        assert err.startswith("featurebank: error: config file ") and expected in err and config in err, (kind, err)
        assert seconds < 5, (kind, seconds)
    assert time.monotonic() - t < 120
    assert not (tmp_path / "featurebank-store").exists()


def test_a_utf8_config_still_reads(tmp_path, digits_folder):
    from featurebank.pipelines.cli import parse

    config = tmp_path / "run.toml"
    config.write_text('dataset = "café"\nbatch-size = 4\n', encoding="utf-8")
    _, (params, _) = parse(["extract", str(digits_folder), "--config", str(config)])
    assert params.dataset == "café" and params.batch_size == 4
