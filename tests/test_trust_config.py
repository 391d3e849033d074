"""--config reads only a small regular UTF-8 file: a FIFO, /dev/zero, a huge file or a non-UTF-8 file are
each one line, at once (a FIFO blocked forever, /dev/zero grew to 7.7 GB, Latin-1 was a traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

CHILD = r"""
import sys, time
from featurebank.pipelines.cli import main
t = time.perf_counter()
code = main(["extract", sys.argv[1], "--config", sys.argv[2]])
print(code, round(time.perf_counter() - t, 2))
"""


def _run(folder, config) -> tuple[int, float, str]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(config)], capture_output=True, text=True,
                         timeout=60)
    code, seconds = out.stdout.split()
    return int(code), float(seconds), out.stderr


@pytest.mark.parametrize("kind, expected", [
    ("latin1", "is not UTF-8 text"),
    ("fifo", "is a FIFO, not a regular file"),
    ("dev-zero", "is a character device, not a regular file"),
    ("huge", "more than the 1,048,576 allowed"),
    ("folder", "is a folder, not a regular file"),
])
def test_a_config_that_is_not_a_small_utf8_file_is_one_line_at_once(tmp_path, digits_folder, kind, expected):
    config = tmp_path / "run.toml"
    if kind == "latin1":
        config.write_bytes('dataset = "caf\u00e9"\n'.encode("latin-1"))
    elif kind == "fifo":
        os.mkfifo(config)  # nothing ever writes: open() blocks for good unless it does not wait
    elif kind == "dev-zero":
        config = "/dev/zero"
    elif kind == "huge":
        with open(config, "wb") as f:
            f.truncate(3 << 30)  # 3 GiB (sparse): never read into memory
    else:
        config.mkdir()
    t = time.monotonic()
    code, seconds, err = _run(digits_folder, config)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("featurebank: error: config file "), err
    assert expected in err and str(config) in err, err
    assert seconds < 5 and time.monotonic() - t < 60
    assert not (tmp_path / "featurebank-store").exists()


def test_a_utf8_config_still_reads(tmp_path, digits_folder):
    from featurebank.pipelines.cli import parse

    config = tmp_path / "run.toml"
    config.write_text('dataset = "café"\nbatch-size = 4\n', encoding="utf-8")
    _, (params, _) = parse(["extract", str(digits_folder), "--config", str(config)])
    assert params.dataset == "café" and params.batch_size == 4
