"""featurebank as a library: one import name that nothing in a user's working directory can shadow."""

from __future__ import annotations

import subprocess
import sys


def test_one_import_name_that_a_users_own_modules_do_not_shadow(tmp_path):
    # a notebook folder with its own data.py, classifiers.py and a features/ folder of images
    (tmp_path / "data.py").write_text("raise SystemExit('the user data.py was imported')\n")
    (tmp_path / "classifiers.py").write_text("raise SystemExit('the user classifiers.py was imported')\n")
    (tmp_path / "features").mkdir()
    (tmp_path / "features" / "cat.png").write_bytes(b"\x89PNG")
    code = (
        "import importlib.util, featurebank\n"
        "from featurebank.features.store import read_features\n"
        "from featurebank.data.sources import open_source\n"
        "from featurebank.classifiers.probes import make_probe\n"
        "import featurebank.pipelines.cli\n"
        # the four folders are installed only under featurebank: no top-level pipelines package exists
        "assert importlib.util.find_spec('pipelines') is None\n"
        "print(featurebank.__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "featurebank"
