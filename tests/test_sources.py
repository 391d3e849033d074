"""Sources list samples deterministically with stable ids, labels and hash-decided splits."""

from __future__ import annotations

import os

import pytest

# Internals, on purpose: the data layer (sources, ids, splits): internals by design.
from featurebank.data.sources import SourceError, escape_id, image_folder, manifest, open_source, split_of, unescape_id


def test_image_folder_lists_sorted_relative_ids_with_labels(digits_folder):
    src = image_folder(digits_folder)
    assert src.name == "digits"
    assert [s.id for s in src.samples] == sorted(s.id for s in src.samples)
    assert all(s.id.split(os.sep)[0] == s.label for s in src.samples)
    assert src.classes == ["0", "1", "7"] and len(src.samples) == 18


def test_split_is_stable_as_the_folder_grows(digits_folder):
    before = {s.id: split_of(s.id) for s in image_folder(digits_folder).samples}
    (digits_folder / "1" / "new.png").write_bytes((digits_folder / "1" / os.listdir(digits_folder / "1")[0]).read_bytes())
    after = {s.id: split_of(s.id) for s in image_folder(digits_folder).samples}
    assert all(after[i] == sp for i, sp in before.items())
    # roughly a fifth of a large id set is held out for testing
    share = sum(split_of(f"x/{i}.png") == "test" for i in range(10000)) / 10000
    assert 0.18 < share < 0.22


def test_manifest_csv_with_splits(tmp_path, digits_folder):
    rows = ["path,label,split"]
    for s in image_folder(digits_folder).samples[:6]:
        rows.append(f"{s.loc},{s.label},{'test' if s.id.endswith('0.png') else 'train'}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    src = open_source(tmp_path / "m.csv")
    assert src.name == "m" and len(src.samples) == 6 and all(s.split in ("train", "test") for s in src.samples)
    (tmp_path / "bad.csv").write_text("file,label\na.png,x\n")
    with pytest.raises(SourceError, match="no 'path' column"):
        manifest(tmp_path / "bad.csv")


def test_missing_and_empty_sources_are_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no image files"):
        image_folder(tmp_path / "empty")


def test_non_utf8_ids_are_escaped_reversibly():
    raw = os.fsdecode(b"caf\xe9 \\ x/\xff.png")
    stored = escape_id(raw)
    stored.encode("utf-8")  # storable as UTF-8
    assert unescape_id(stored) == raw
    assert escape_id("plain/ü.png") == "plain/ü.png"
