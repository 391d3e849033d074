"""A modality lives in data/ and features/ only (issue 23, item 1): outside them, and outside the baselines of
classifiers/train.py, no module compares anything to a modality's name or guesses a source's modality with
getattr. docs/architecture.md's table "What each kind of addition touches" lists what a new modality touches;
this check keeps the rest of the tree out of that list. A static check over the source: no model is loaded."""

from __future__ import annotations

import ast
from pathlib import Path

from featurebank.data.sources import FORMAT_MODALITIES, FORMATS, register_format, source_modality
from featurebank.features.registry import PREPARES

ROOT = Path(__file__).resolve().parents[1]
#: where a modality's own code lives (the table's places), and the baselines: one per modality, by name
ALLOWED = ("data/", "features/", "classifiers/train.py")
SKIPPED = ("tests/", "benchmarks/", ".venv/", "build/", "docs/")
MODALITIES = set(FORMAT_MODALITIES.values()) | set(PREPARES)


def modality_branches(code: str) -> list[int]:
    """Lines of ``code`` that compare something named like a modality to a modality's name, or read a
    ``modality`` attribute with a default (``getattr(source, "modality", "image")``)."""
    tree, hits = ast.parse(code), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            parts = [node.left, *node.comparators]
            names = any(isinstance(p, ast.Constant) and p.value in MODALITIES for p in parts)
            about = any("modality" in ast.unparse(p) for p in parts)
            if names and about:
                hits.append(node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
              and len(node.args) == 3 and isinstance(node.args[1], ast.Constant) and node.args[1].value == "modality"):
            hits.append(node.lineno)
    return sorted(set(hits))


def test_the_check_finds_the_branches_it_forbids():
    assert MODALITIES >= {"image", "text"}
    assert modality_branches('text = getattr(source, "modality", "image") == "text"') == [1]
    assert modality_branches('if self.modality == "text":\n    pass\nelif i["modality"] != "image":\n    pass') == [1, 3]
    assert modality_branches('column = next(c for c in ("text", "path") if c in df.columns)') == []


def test_no_module_outside_data_features_and_the_baselines_branches_on_a_modality_name():
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(ALLOWED + SKIPPED):
            continue
        found += [f"{rel}:{line}" for line in modality_branches(path.read_text())]
    assert not found, f"modality-specific code outside data/ and features/: {found}"


def test_a_registered_format_carries_its_modality(tmp_path, monkeypatch):
    """A new modality's data module registers its format with its modality; sources.py knows no modality
    by name: the registry answers source_modality and the format joins --source-format's values."""
    import featurebank.data.sources as sources

    monkeypatch.setattr(sources, "FORMATS", FORMATS)
    for table in ("FORMAT_OPENERS", "FORMAT_DETECTORS", "FORMAT_MODALITIES"):
        monkeypatch.setattr(sources, table, dict(getattr(sources, table)))
    clip = tmp_path / "clips"
    clip.mkdir()
    opened = []
    register_format("wav", lambda location, name=None, **options: opened.append(options),
                    detect=lambda location, text_column=None: Path(location) == clip, modality="audio")
    assert source_modality(clip) == "audio" and sources.FORMATS[-1] == "wav"
    sources.open_source(clip, text_column="x")
    assert opened and opened[0]["text_column"] == "x"  # every opener is given every option, takes what it needs
    assert source_modality(tmp_path) == "image"  # the built-in folder lists images
