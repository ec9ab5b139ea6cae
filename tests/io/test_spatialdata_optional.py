"""The SpatialData format without the optional extra: detected by its files alone, and reading it
says how to install what it needs (runs with or without spatialdata installed)."""

from __future__ import annotations

import builtins
import json

import pytest

from napari_stlnmf import io
from napari_stlnmf._napari.reader import napari_get_reader
from napari_stlnmf.errors import SpatialDataError


@pytest.fixture
def store_files(tmp_path):
    """The root of a SpatialData store as spatialdata writes it (zarr v3 attributes)."""
    root = tmp_path / "slide.zarr"
    (root / "tables").mkdir(parents=True)
    attrs = {"spatialdata_attrs": {"version": "0.2"}}
    (root / "zarr.json").write_text(json.dumps({"attributes": attrs, "zarr_format": 3}))
    return root


@pytest.fixture
def without_spatialdata(monkeypatch):
    real_import = builtins.__import__

    def no_spatialdata(name, *args, **kwargs):
        if name == "spatialdata" or name.startswith("spatialdata."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_spatialdata)


def test_store_is_detected_from_its_files(store_files, tmp_path):
    assert io.find_slide_format(store_files).name == "spatialdata"
    assert napari_get_reader(str(store_files)) is not None
    (tmp_path / "other.zarr").mkdir()
    assert io.find_slide_format(tmp_path / "other.zarr") is None


def test_missing_extra_is_our_error_naming_the_install(store_files, without_spatialdata):
    for read in (io.read_slide, io.read_spatialdata):
        with pytest.raises(SpatialDataError, match=r'pip install "napari-stlnmf\[spatialdata\]"'):
            read(store_files)
