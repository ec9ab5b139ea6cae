"""napari_stlnmf.io.table: counts tables with coords= (and an image)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import shared_dir
from scipy import sparse

from napari_stlnmf import io
from napari_stlnmf.errors import CoordinateError, FileFormatError, ImageMismatchError


def _data_dir(name: str) -> Path:
    return shared_dir(name)


def test_read_csv_visium_demo_with_image():
    folder = _data_dir("visium_demo_scanpy")
    coords = pd.read_csv(folder / "coords.csv", index_col=0)
    counts = pd.read_csv(folder / "counts.csv.gz", index_col=0)
    adata = io.read_slide(
        folder / "counts.csv.gz",
        coords=folder / "coords.csv",
        image=folder / "tissue_lowres_image.png",
        scalefactor=0.045004502,
        spot_diameter=89.43,
    )
    assert adata.shape == (100, 100)
    assert sparse.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), counts.to_numpy())
    np.testing.assert_array_equal(adata.obsm["spatial"], coords[["x", "y"]].to_numpy())
    assert list(adata.obs["array_row"]) == list(coords["array_row"])

    image, scalef, diameter = io.get_image(adata)
    assert image.shape == (600, 600, 3) and image.dtype == np.uint8
    assert scalef == pytest.approx(0.045004502)
    assert diameter == pytest.approx(89.43)
    assert io.get_library(adata)[0] == "counts"
    io.validate_slide(adata)
    io.check_image_covers_spots(adata)

    wrong = io.read_slide(
        folder / "counts.csv.gz",
        coords=folder / "coords.csv",
        image=folder / "tissue_lowres_image.png",
        scalefactor=1.0,
    )
    with pytest.raises(ImageMismatchError, match=r"600 x 600.*scale factor") as err:
        io.check_image_covers_spots(wrong)
    assert "0.05" in str(err.value)  # suggests a scale factor of the right magnitude


def test_read_csv_with_10x_positions_as_coords():
    folder = _data_dir("visium_demo_scanpy")
    adata = io.read_slide(folder / "counts.csv.gz", coords=folder / "tissue_positions_all.csv")
    coords = pd.read_csv(folder / "coords.csv", index_col=0)
    np.testing.assert_array_equal(adata.obsm["spatial"], coords[["x", "y"]].to_numpy())
    assert {"in_tissue", "array_row", "array_col"} <= set(adata.obs.columns)


def test_read_csv_mob():
    folder = _data_dir("mob_rep12")
    adata = io.read_slide(folder / "counts.csv.gz", coords=folder / "coords.csv")
    assert adata.shape == (282, 4284)
    coords = pd.read_csv(folder / "coords.csv", index_col=0)
    np.testing.assert_allclose(adata.obsm["spatial"], coords[["x", "y"]].to_numpy())
    assert float(adata.X.sum()) > 0
    # ST array units with ~1 unit pitch: estimated diameter ~0.55
    _, lib = io.get_library(adata)
    assert lib["images"] == {}
    assert 0.3 < lib["scalefactors"]["spot_diameter_fullres"] < 0.8
    assert io.get_image(adata) is None
    io.validate_slide(adata)

    signature = io.read_reference(folder / "reference_signature.csv")
    assert isinstance(signature, pd.DataFrame)
    assert signature.shape == (4284, 5)
    assert all(dt == np.float64 for dt in signature.dtypes)
    io.validate_reference(signature)
    assert io.reference_columns(folder / "reference_signature.csv") == []


def _write_small_table(tmp_path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    counts = pd.DataFrame(
        [[1, 0, 2], [0, 3, 1], [4, 0, 0], [1, 1, 1]],
        index=["s1", "s2", "s3", "s4"],
        columns=["g1", "g2", "g3"],
    )
    coords = pd.DataFrame(
        {"imagecol": [0.0, 1.0, 0.0, 1.0], "imagerow": [0.0, 0.0, 1.0, 1.0]},
        index=["s4", "s3", "s2", "s1"],  # another order than the counts
    )
    coords.to_csv(tmp_path / "coords.csv")
    return counts, coords


def test_read_tsv_aligns_coords_and_array_coords(tmp_path):
    counts, coords = _write_small_table(tmp_path)
    counts.to_csv(tmp_path / "slide.tsv", sep="\t")
    adata = io.read_slide(tmp_path / "slide.tsv", coords=tmp_path / "coords.csv")
    assert list(adata.obs_names) == list(counts.index)
    np.testing.assert_array_equal(adata.X.toarray(), counts.to_numpy())
    np.testing.assert_array_equal(
        adata.obsm["spatial"], coords.loc[counts.index, ["imagecol", "imagerow"]].to_numpy()
    )
    assert io.get_library(adata)[0] == "slide"
    # pitch 1 -> diameter 0.55
    assert io.get_library(adata)[1]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(0.55)

    xy = np.arange(8, dtype=float).reshape(4, 2)
    from_array = io.read_slide(tmp_path / "slide.tsv", coords=xy)
    np.testing.assert_array_equal(from_array.obsm["spatial"], xy)


def test_read_transposed_table_warns(tmp_path):
    counts, _ = _write_small_table(tmp_path)
    counts.T.to_csv(tmp_path / "genes_x_spots.csv.gz")
    with pytest.warns(UserWarning, match="transposed"):
        adata = io.read_slide(tmp_path / "genes_x_spots.csv.gz", coords=tmp_path / "coords.csv")
    assert list(adata.obs_names) == list(counts.index)
    assert list(adata.var_names) == list(counts.columns)
    np.testing.assert_array_equal(adata.X.toarray(), counts.to_numpy())


def test_read_table_errors(tmp_path):
    counts, _ = _write_small_table(tmp_path)
    counts.to_csv(tmp_path / "slide.csv")
    with pytest.raises(CoordinateError, match="coords="):
        io.read_slide(tmp_path / "slide.csv")
    pd.DataFrame({"x": [0.0, 1.0], "y": [0.0, 1.0]}, index=["s1", "s2"]).to_csv(
        tmp_path / "partial.csv"
    )
    with pytest.raises(CoordinateError, match=r"2 of 4 spots.*'s3'"):
        io.read_slide(tmp_path / "slide.csv", coords=tmp_path / "partial.csv")
    pd.DataFrame({"a": [0.0], "b": [0.0], "c": [1.0]}, index=["s1"]).to_csv(tmp_path / "bad.csv")
    with pytest.raises(CoordinateError, match="x/y"):
        io.read_slide(tmp_path / "slide.csv", coords=tmp_path / "bad.csv")
    counts.assign(symbol="x").to_csv(tmp_path / "annotated.csv")
    with pytest.raises(FileFormatError, match=r"non-numeric.*'symbol'"):
        io.read_slide(tmp_path / "annotated.csv", coords=tmp_path / "coords.csv")
