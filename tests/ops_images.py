"""Small image folders for the operations tests: scikit-learn's 8x8 digits as 32 px PNGs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


def digit_images(n_per_class: int = 12, classes=(0, 1), offset: int = 0):
    """``(label, name, uint8 image)`` for the first ``n_per_class`` digits of each class after ``offset``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    for c in classes:
        idx = np.flatnonzero(d.target == c)[offset:offset + n_per_class]
        for i in idx:
            img = (d.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
            yield str(c), f"{i:04d}", np.kron(img, np.ones((4, 4), np.uint8))


def write_folder(root: str | os.PathLike, n_per_class: int = 12, classes=(0, 1), offset: int = 0,
                 subfolder: str = "") -> list[str]:
    """Write digit PNGs as ``root/<class>/<subfolder>/<index>.png``; return the sample ids written."""
    root = Path(root)
    ids = []
    for label, name, img in digit_images(n_per_class, classes, offset):
        d = root / label / subfolder
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{name}.png")
        ids.append(str((d / f"{name}.png").relative_to(root)))
    return ids


def alive(pids) -> list[int]:
    """The processes among ``pids`` that still run (zombies, dead and reaped ones excluded)."""
    import psutil

    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out
