"""Lets the benchmarks run from a source checkout that was never installed (a GPU machine with its own
Python and no ``pip install``): ``featurebank`` is the repository's root, so it is registered from there
when no installed copy is found. An installed featurebank (``make install``) is used as it is."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def use_checkout() -> None:
    if "featurebank" in sys.modules or importlib.util.find_spec("featurebank") is not None:
        return
    spec = importlib.util.spec_from_file_location("featurebank", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["featurebank"] = module
    spec.loader.exec_module(module)
