"""SpatialData stores: reading a slide from a table and its circles, deconvolving, writing back.

The store is :func:`spatialdata_testdata.make_sdata`, laid out as spatialdata-io lays out a
Visium slide.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from napari_stlnmf import deconvolve, io
from napari_stlnmf.errors import CoordinateError, SpatialDataError
from napari_stlnmf.io.spatialdata import SOURCE_KEY, WORLD_AFFINE_KEY, detect

sd = pytest.importorskip("spatialdata")

from spatialdata_testdata import MICRONS_PER_FULLRES_PIXEL, ORIGIN, make_sdata


@pytest.fixture(scope="module")
def store(demo, tmp_path_factory):
    slide, _ = demo
    sdata, order = make_sdata(slide)
    path = tmp_path_factory.mktemp("sdata") / "slide.zarr"
    sdata.write(path)
    return path, order


@pytest.fixture(scope="module")
def result(demo, store):
    _, reference = demo
    return deconvolve(store[0], reference, cell_type_key="cell_type", seed=0)


def _tree_snapshot(path):
    return {
        os.path.relpath(os.path.join(root, f), path): os.stat(os.path.join(root, f)).st_mtime_ns
        for root, _, files in os.walk(path)
        for f in files
    }


def test_detects_store_and_not_other_folders(store, tmp_path):
    assert detect(store[0])
    assert io.find_slide_format(store[0]).name == "spatialdata"
    (tmp_path / "plain.zarr").mkdir()
    assert not detect(tmp_path / "plain.zarr")
    assert not detect(tmp_path / "missing.zarr")


def test_read_places_spots_in_image_pixels_in_table_order(demo, store):
    slide, _ = demo
    path, order = store
    before = _tree_snapshot(path)
    adata = io.read_slide(path)
    assert _tree_snapshot(path) == before  # reading never writes to the store

    scalef = slide.uns["spatial"]["demo"]["scalefactors"]["tissue_hires_scalef"]
    assert list(adata.obs_names) == [str(1000 + i) for i in order]
    assert list(adata.obs["barcode"]) == list(slide.obs_names[order])
    np.testing.assert_array_equal(adata.X.toarray(), slide.X[order].toarray())
    # level-0 image pixels: the circles' full-resolution pixels times the hires scale factor
    expected = np.asarray(slide.obsm["spatial"])[order] * scalef
    np.testing.assert_allclose(adata.obsm["spatial"], expected, atol=1e-6)

    image, image_scalef, diameter = io.get_image(adata)
    assert image.shape == slide.uns["spatial"]["demo"]["images"]["hires"].shape
    assert image_scalef == pytest.approx(1.0)
    assert diameter == pytest.approx(35.2 * scalef)
    io.check_image_covers_spots(adata)
    affine = np.asarray(adata.uns["spatial"]["demo_hires_image"]["metadata"][WORLD_AFFINE_KEY])
    step = MICRONS_PER_FULLRES_PIXEL / scalef
    np.testing.assert_allclose(affine, [[step, 0, ORIGIN[0]], [0, step, ORIGIN[1]], [0, 0, 1]])
    assert adata.uns[SOURCE_KEY]["table"] == "table"
    assert adata.uns[SOURCE_KEY]["region"] == "spots"


def test_read_in_coordinate_system_without_image(demo, store):
    slide, _ = demo
    path, order = store
    adata = io.read_spatialdata(path, image=None)  # default: the store's hires image
    assert "hires" in adata.uns["spatial"]["demo_hires_image"]["images"]
    sdata = sd.read_zarr(path)
    del sdata.images["demo_hires_image"]
    bare = io.read_spatialdata(sdata)
    expected = np.asarray(slide.obsm["spatial"])[order] * MICRONS_PER_FULLRES_PIXEL + ORIGIN
    np.testing.assert_allclose(bare.obsm["spatial"], expected, atol=1e-6)
    assert io.get_image(bare) is None
    assert io.spot_diameter(bare) == pytest.approx(35.2 * MICRONS_PER_FULLRES_PIXEL)


def test_deconvolve_store_and_write_results_back(demo, store, result, tmp_path):
    import shutil

    slide, _ = demo
    path = tmp_path / "copy.zarr"
    shutil.copytree(store[0], path)
    types = [str(t) for t in result.proportions.columns]
    assert result.proportions.notna().all().all()
    truth = slide.obsm["true_proportions"].iloc[store[1]].set_axis(result.proportions.index)
    assert float(np.sqrt(((result.proportions - truth[types]) ** 2).to_numpy().mean())) < 0.15

    out = io.write_spatialdata_results(path, result)
    back = sd.read_zarr(path).tables["table"]
    for written in (out.tables["table"], back):
        for t in types:
            np.testing.assert_allclose(
                written.obs[f"stlnmf_{t}"].to_numpy(), result.proportions[t].to_numpy()
            )
        props = written.obsm["stlnmf_proportions"]
        np.testing.assert_allclose(np.asarray(props), result.proportions.to_numpy())
        assert set(written.obs["stlnmf_dominant_type"].astype(str)) <= set(types)
        assert written.obs["stlnmf_qc"].astype(str).eq("ok").all()
    assert not any(p.name.endswith(("_staging", "_old")) for p in (path / "tables").iterdir())

    # round trip: the slide reads back, with its results (the napari reader shows the maps)
    again = io.read_slide(path)
    assert list(again.obs_names) == list(result.proportions.index)
    np.testing.assert_allclose(
        np.asarray(again.obsm["stlnmf_proportions"]), result.proportions.to_numpy()
    )
    # a new table instead, re-written on a second call
    io.write_spatialdata_results(path, result, new_table="stlnmf_results")
    io.write_spatialdata_results(path, result, new_table="stlnmf_results", prefix="p_")
    extra = sd.read_zarr(path).tables["stlnmf_results"]
    assert list(extra.var_names) == types and "p_dominant_type" in extra.obs
    with pytest.raises(SpatialDataError, match="not written by napari-stlnmf"):
        io.write_spatialdata_results(path, result, new_table="table")


def test_write_to_object_in_memory_leaves_the_old_table(store, result):
    sdata = sd.read_zarr(store[0])
    old = sdata.tables["table"]
    before = _tree_snapshot(store[0])
    out = io.write_spatialdata_results(sdata, result)  # an object: in memory only by default
    assert out is sdata and sdata.tables["table"] is not old
    assert (
        "stlnmf_proportions" not in old.obsm and "stlnmf_proportions" in sdata.tables["table"].obsm
    )
    assert _tree_snapshot(store[0]) == before


def test_deconvolve_accepts_a_spatialdata_object(demo, store, result):
    _, reference = demo
    sdata = sd.read_zarr(store[0])
    again = deconvolve(sdata, reference, cell_type_key="cell_type", seed=0)
    np.testing.assert_allclose(again.proportions.to_numpy(), result.proportions.to_numpy())


def test_wrong_names_list_the_available_ones(store, result):
    sdata = sd.read_zarr(store[0])
    with pytest.raises(SpatialDataError, match=r"'nope'.*available: 'table'"):
        io.read_spatialdata(sdata, table="nope")
    with pytest.raises(SpatialDataError, match=r"does not annotate 'cells'.*'spots'"):
        io.read_spatialdata(sdata, region="cells")
    with pytest.raises(SpatialDataError, match=r"'he'.*available: 'demo_hires_image'"):
        io.read_spatialdata(sdata, image="he")
    with pytest.raises(SpatialDataError, match=r"coordinate system 'aligned'.*'global'"):
        io.read_spatialdata(sdata, coordinate_system="aligned")
    with pytest.raises(SpatialDataError, match=r"available: 'table'"):
        io.write_spatialdata_results(sdata, result, table="counts")


def test_rows_without_geometry_are_named(store):
    sdata = sd.read_zarr(store[0])
    sdata.shapes["spots"] = sdata.shapes["spots"].iloc[5:]
    with pytest.raises(CoordinateError, match="5 of 836 rows"):
        io.read_spatialdata(sdata)


@pytest.mark.parametrize("region", ["squares", "spot_points"])
def test_squares_and_points_read_like_circles(store, region):
    from spatialdata_testdata import with_squares_and_points

    sdata = with_squares_and_points(sd.read_zarr(store[0]))
    circles = io.read_spatialdata(sdata, region="spots")
    other = io.read_spatialdata(sdata, region=region)
    assert list(other.obs_names) == list(circles.obs_names)
    np.testing.assert_allclose(other.obsm["spatial"], circles.obsm["spatial"], atol=1e-6)
    np.testing.assert_array_equal(other.X.toarray(), circles.X.toarray())
    if region == "squares":  # a circle of the square's area
        ratio = io.spot_diameter(other) / io.spot_diameter(circles)
        assert ratio == pytest.approx(2 / np.sqrt(np.pi))
    with pytest.raises(SpatialDataError, match=r"'spots', 'squares', 'spot_points'.*region="):
        io.read_spatialdata(sdata)
