"""The one atomic-write idiom (data.files) and the rule that only the store package imports h5py."""

from __future__ import annotations

import os

import pytest

from featurebank.data.files import atomic_folder, atomic_path, atomic_write
from architecture import PACKAGE_FOLDERS, ROOT, imports_of


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write(target, "old\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed while writing")
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["metrics.json"]
    atomic_write(target, b"new\n")
    assert target.read_bytes() == b"new\n" and os.listdir(tmp_path) == ["metrics.json"]


def test_a_folder_appears_whole_and_one_another_process_finished_first_is_kept(tmp_path):
    target = tmp_path / "v1"
    with atomic_folder(target) as tmp:
        (tmp / "manifest.json").write_text("{}")
        assert not target.exists()  # nothing visible until the block ends
    assert (target / "manifest.json").read_text() == "{}"
    with atomic_folder(target) as tmp:  # the other writer got there first: its folder stays
        (tmp / "manifest.json").write_text('{"second": true}')
    assert (target / "manifest.json").read_text() == "{}"
    assert sorted(os.listdir(tmp_path)) == ["v1"]  # no temporary folder left


def test_only_the_store_package_imports_h5py(tmp_path):
    probe = tmp_path / "m.py"
    probe.write_text("def f():\n    import h5py.h5f\n\nfrom h5py import File\n")
    assert sorted(imports_of(probe)) == [(2, "h5py"), (4, "h5py")]  # function-level imports count
    store = ROOT / "features" / "store"
    outside = [str(p.relative_to(ROOT)) for folder in PACKAGE_FOLDERS for p in (ROOT / folder).rglob("*.py")
               if not p.is_relative_to(store) and any(name == "h5py" for _, name in imports_of(p))]
    assert outside == []
    assert any(name == "h5py" for _, name in imports_of(store / "reader.py"))
