"""The one folder where featurebank keeps what it can rebuild: converted models, fetched remote files.

``$FEATUREBANK_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/featurebank``, else ``~/.cache/featurebank``;
shared by every process of the user (and by the test suite). A file enters it whole or not at all,
through :func:`featurebank.data.files.atomic_path` like every file the project writes.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    env = os.environ.get("FEATUREBANK_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "featurebank"
