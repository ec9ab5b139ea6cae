"""napari_stlnmf.io.registry: the slide formats read_slide and the napari reader share."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from io_testdata import make_outs, small_slide

from napari_stlnmf import io
from napari_stlnmf._napari.reader import napari_get_reader
from napari_stlnmf.errors import FileFormatError
from napari_stlnmf.io.registry import SlideFormat

ROOT = Path(__file__).resolve().parents[2]


def test_builtin_formats_in_order():
    assert [fmt.name for fmt in io.slide_formats()] == [
        "h5ad",
        "visium_hd",
        "spaceranger",
        "table",
        "spatialdata",
    ]


def test_find_slide_format_on_each_kind(tmp_path):
    outs = make_outs(tmp_path, header=True)
    slide = tmp_path / "slide.h5ad"
    small_slide(dense=False).write_h5ad(slide)
    reference = tmp_path / "reference.h5ad"
    ad.AnnData(X=np.ones((2, 2), dtype=np.float32)).write_h5ad(reference)
    tables = [tmp_path / name for name in ("counts.csv", "counts.TSV", "counts.txt.gz")]
    for path in tables:
        path.write_bytes(b"")
    other = tmp_path / "slide.xlsx"
    other.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()

    def name(path):
        fmt = io.find_slide_format(path)
        return None if fmt is None else fmt.name

    assert name(slide) == "h5ad" and name(str(slide)) == "h5ad"
    assert name(reference) == "h5ad"  # still an .h5ad; only napari needs obsm['spatial']
    assert name(outs) == name(outs.parent) == "spaceranger"
    assert [name(path) for path in tables] == ["table"] * 3
    assert name(other) is None and name(empty) is None
    assert name(tmp_path / "missing.h5ad") is None and name(tmp_path / "missing.csv") is None

    fmt = {f.name: f for f in io.slide_formats()}
    assert fmt["h5ad"].has_positions(slide) and not fmt["h5ad"].has_positions(reference)
    assert fmt["spaceranger"].has_positions(outs)
    assert not fmt["table"].has_positions(tables[0])  # positions come from coords=
    junk = tmp_path / "junk.h5ad"
    junk.write_text("not hdf5")
    assert name(junk) == "h5ad" and not fmt["h5ad"].has_positions(junk)
    assert napari_get_reader(str(tables[0])) is None  # a table alone cannot be opened


def _read_mytsv(path, *, library_id=None, **_other_options):
    """Toy format: a header-less TSV of x, y, then the counts of each spot."""
    table = np.loadtxt(path, delimiter="\t", ndmin=2)
    adata = ad.AnnData(
        X=table[:, 2:].astype(np.float32),
        obs=pd.DataFrame(index=[f"spot{i}" for i in range(len(table))]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(table.shape[1] - 2)]),
    )
    adata.obsm["spatial"] = table[:, :2]
    adata.uns["spatial"] = {library_id or path.stem: {"images": {}, "scalefactors": {}}}
    return adata


@pytest.fixture
def mytsv_format():
    fmt = SlideFormat(
        name="mytsv",
        detect=lambda path: path.suffix == ".mytsv" and path.is_file(),
        read=_read_mytsv,
        description="a .mytsv file (x, y, counts per line)",
    )
    io.register_slide_format(fmt)
    yield fmt
    io.unregister_slide_format("mytsv")


def test_registered_format_used_by_read_slide_and_napari(tmp_path, mytsv_format):
    path = tmp_path / "toy.mytsv"
    np.savetxt(path, [[0, 0, 1, 2], [10, 0, 3, 0], [0, 10, 0, 5]], delimiter="\t")
    assert io.find_slide_format(path) is mytsv_format

    adata = io.read_slide(path, library_id="toy_lib")
    assert adata.shape == (3, 2) and list(adata.uns["spatial"]) == ["toy_lib"]
    np.testing.assert_array_equal(adata.obsm["spatial"], [[0, 0], [10, 0], [0, 10]])

    reader = napari_get_reader(str(path))
    assert callable(reader)
    layers = reader(str(path))
    assert [kind for _, _, kind in layers] == ["points"]
    np.testing.assert_array_equal(layers[0][0], [[0, 0], [0, 10], [10, 0]])  # (row, col)
    assert layers[0][1]["size"] == pytest.approx(io.spot_diameter(adata))

    with pytest.raises(FileFormatError, match=r"\.mytsv file"):  # listed as supported
        io.read_slide(tmp_path)


def test_unregistered_format_is_gone(tmp_path, mytsv_format):
    path = tmp_path / "toy.mytsv"
    path.write_text("0\t0\t1\n")
    assert io.unregister_slide_format("mytsv") is mytsv_format
    assert io.find_slide_format(path) is None and napari_get_reader(str(path)) is None
    with pytest.raises(FileFormatError, match="Supported inputs"):
        io.read_slide(path)
    assert "mytsv" not in [fmt.name for fmt in io.slide_formats()]
    assert io.unregister_slide_format("mytsv") is None
    io.register_slide_format(mytsv_format)  # the fixture unregisters it again


def test_register_replaces_by_name_and_checks_type(mytsv_format):
    other = SlideFormat("mytsv", lambda path: False, _read_mytsv, "another toy")
    io.register_slide_format(other)
    names = [fmt.name for fmt in io.slide_formats()]
    assert names.count("mytsv") == 1 and io.slide_formats()[-1] is other
    with pytest.raises(TypeError, match="SlideFormat"):
        io.register_slide_format(("mytsv", None))


def test_napari_reader_imports_neither_torch_nor_anndata(tmp_path):
    """napari asks the reader about every file it opens: that must stay cheap."""
    slide = tmp_path / "slide.h5ad"
    small_slide(dense=True).write_h5ad(slide)
    outs = make_outs(tmp_path, header=True)
    code = textwrap.dedent(
        f"""
        import sys
        import napari_stlnmf._napari.reader as r
        r.napari_get_reader('x.h5ad')
        assert 'torch' not in sys.modules
        assert r.napari_get_reader({str(slide)!r}) is not None
        assert r.napari_get_reader({str(outs)!r}) is not None
        import napari_stlnmf.io.registry
        heavy = sorted({{'torch', 'anndata'}} & set(sys.modules))
        assert not heavy, heavy
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path])}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr
