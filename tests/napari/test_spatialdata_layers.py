"""Layers opened by napari-spatialdata (built here as it builds them: element coordinates as data,
the element's affine to the coordinate system as the layer's ``affine``, the table in
``metadata``) become a slide in the image's pixels; this plugin's reader opens the store in the
same world frame. Headless: napari layer models need no Qt."""

from __future__ import annotations

import numpy as np
import pytest

napari = pytest.importorskip("napari")
sd = pytest.importorskip("spatialdata")

from spatialdata_testdata import make_sdata, with_squares_and_points

from napari_stlnmf import deconvolve, io
from napari_stlnmf._napari.reader import napari_get_reader
from napari_stlnmf.layers import (
    SLIDE_TAG,
    image_for_features,
    is_spatialdata_layer,
    layer_to_world,
    result_layers,
    slide_on_image,
    spots_from_spatialdata_layer,
    write_results_to_spatialdata_layer,
)


@pytest.fixture(scope="module")
def store(demo, tmp_path_factory):
    sdata, _ = make_sdata(demo[0], seed=1)
    path = tmp_path_factory.mktemp("sdata") / "slide.zarr"
    sdata.write(path)
    return path


def _affine(element):
    """napari-spatialdata's layer affine: the element's transformation as a (y, x) matrix."""
    from spatialdata.transformations import get_transformation

    return get_transformation(element, "global").to_affine_matrix(
        input_axes=("y", "x"), output_axes=("y", "x")
    )


def _metadata(sdata, name, indices):
    _, adata = sd.join_spatialelement_table(
        sdata=sdata, spatial_element_names=name, table_name=_table_of(sdata, name),
        how="left", match_rows="left",
    )  # fmt: skip
    table = sdata.tables[_table_of(sdata, name)]
    return {
        "sdata": sdata,
        "adata": adata,
        "region_key": table.uns["spatialdata_attrs"]["region_key"],
        "instance_key": table.uns["spatialdata_attrs"]["instance_key"],
        "table_names": [_table_of(sdata, name)],
        "name": name,
        "_current_cs": "global",
        "indices": list(indices),
    }


def _table_of(sdata, name):
    return next(iter(sdata.tables))


def circles_layer(sdata, name="spots"):
    df = sdata.shapes[name]
    yx = np.column_stack([df.geometry.y, df.geometry.x])
    metadata = _metadata(sdata, name, df.index)
    size = 2 * df["radius"].to_numpy()
    return napari.layers.Points(yx, affine=_affine(df), size=size, metadata=metadata)


def polygons_layer(sdata, name="squares"):
    df = sdata.shapes[name]
    polygons = [np.asarray(g.exterior.coords)[:-1, ::-1] for g in df.geometry]  # (y, x) vertices
    metadata = _metadata(sdata, name, df.index)
    return napari.layers.Shapes(
        polygons, shape_type="polygon", affine=_affine(df), metadata=metadata
    )


def image_layer(sdata, name="demo_hires_image"):
    tree = sdata.images[name]
    levels = [next(iter(tree[k].values())).transpose("y", "x", "c") for k in tree.children]
    metadata = {"sdata": sdata, "name": name}
    return napari.layers.Image(
        levels, rgb=True, multiscale=True, affine=_affine(tree), metadata=metadata
    )


def _slide(spots, image):
    adata = spots_from_spatialdata_layer(
        spots.data, spots.metadata, sizes=getattr(spots, "size", None)
    )
    data, to_world = image_for_features(
        image.data, layer_to_world(image), multiscale=True,
        downsample_factors=image.downsample_factors,
    )  # fmt: skip
    return slide_on_image(adata, layer_to_world(spots), data, to_world)


def test_circles_and_image_of_napari_spatialdata_become_the_read_slide(store):
    sdata = sd.read_zarr(store)
    spots, image = circles_layer(sdata), image_layer(sdata)
    assert is_spatialdata_layer(spots.metadata) and not is_spatialdata_layer({"adata": 1})
    np.testing.assert_allclose(layer_to_world(spots), _affine(sdata.shapes["spots"]))

    slide = _slide(spots, image)
    expected = io.read_slide(store)
    slide = slide[expected.obs_names]  # the layer's order is the circles', the table's differs
    # napari puts the image's xarray pixel centres at +0.5 (spatialdata's pixels start at their
    # corner); read_spatialdata, like spatialdata-io's Visium reader, does not: half a pixel
    np.testing.assert_allclose(slide.obsm["spatial"], expected.obsm["spatial"], atol=0.51)
    np.testing.assert_array_equal(slide.X.toarray(), expected.X.toarray())
    assert io.spot_diameter(slide) == pytest.approx(io.spot_diameter(expected))
    image_pixels, scalef, _ = io.get_image(slide)
    assert image_pixels.shape == (600, 600, 3) and scalef == 1.0


def test_polygons_layer_gives_the_same_spots(store):
    sdata = with_squares_and_points(sd.read_zarr(store))
    circles = _slide(circles_layer(sdata), image_layer(sdata))
    squares = _slide(polygons_layer(sdata), image_layer(sdata))
    np.testing.assert_allclose(squares.obsm["spatial"], circles.obsm["spatial"], atol=1e-6)
    ratio = io.spot_diameter(squares) / io.spot_diameter(circles)
    assert ratio == pytest.approx(2 / np.sqrt(np.pi))  # a circle of the square's area


def test_reader_opens_store_in_the_coordinate_system(store):
    reader = napari_get_reader(str(store))
    assert reader is not None
    image_data, image_kwargs, _ = reader(str(store))[0]
    spots_data, spots_kwargs, kind = reader(str(store))[-1]
    assert kind == "points" and SLIDE_TAG in spots_kwargs["metadata"]
    ours = napari.layers.Points(spots_data, affine=spots_kwargs["affine"])
    theirs = circles_layer(sd.read_zarr(store))
    ids = spots_kwargs["metadata"]["adata"].obs_names
    where = {str(i): k for k, i in enumerate(theirs.metadata["indices"])}
    for k in (0, 17, 400):  # the same spot lands on the same world point
        np.testing.assert_allclose(
            ours.data_to_world(spots_data[k]),
            theirs.data_to_world(theirs.data[where[ids[k]]]),
            atol=1e-6,
        )
    img = napari.layers.Image(
        image_data, rgb=True, scale=image_kwargs["scale"], affine=image_kwargs["affine"]
    )
    np.testing.assert_allclose(
        layer_to_world(img), _affine(sd.read_zarr(store)["demo_hires_image"])
    )


def test_deconvolve_layers_and_write_back_to_their_sdata(demo, store):
    sdata = sd.read_zarr(store)
    spots = circles_layer(sdata)
    image = image_layer(sdata)
    slide = _slide(spots, image)
    result = deconvolve(slide, demo[1], cell_type_key="cell_type", seed=0)
    layers = result_layers(
        result.proportions, result.fit_error, result.qc, result.adata, annotated=result.adata
    )
    # drawn where the image layer is: image pixels -> world by the image layer's own transform
    np.testing.assert_allclose(layers[0][1]["affine"], layer_to_world(image))
    assert write_results_to_spatialdata_layer(spots.metadata, result) == "table"
    assert f"stlnmf_{result.proportions.columns[0]}" in spots.metadata["adata"].obs
    table = sdata.tables["table"]
    for t in result.proportions.columns:
        by_id = table.obs.set_index(table.obs["spot_id"].astype(str))[f"stlnmf_{t}"]
        np.testing.assert_allclose(
            by_id.loc[result.proportions.index].to_numpy(), result.proportions[t].to_numpy()
        )


def test_widget_deconvolves_napari_spatialdata_layers(
    make_napari_viewer, qtbot, store, monkeypatch
):
    import napari_stlnmf._napari.widget as w
    from napari_stlnmf.datasets import DEMO_REFERENCE

    errors = []
    monkeypatch.setattr(w, "show_error", lambda msg: errors.append(str(msg)))
    viewer = make_napari_viewer()
    sdata = sd.read_zarr(store)
    image = viewer.add_layer(image_layer(sdata))
    viewer.add_layer(napari.layers.Image(np.zeros((5, 5))))  # an unrelated image
    spots = viewer.add_layer(circles_layer(sdata))
    _, widget = viewer.window.add_plugin_dock_widget("napari-stlnmf", "Deconvolve cell types")
    assert widget.spots.value is spots
    assert widget.image.value is image  # the image of the same SpatialData
    widget.reference.value = str(DEMO_REFERENCE)
    widget.cell_type_key.value = "cell_type"
    job = widget._job()
    expected = io.read_slide(store)
    np.testing.assert_allclose(
        job.slide[expected.obs_names].obsm["spatial"], expected.obsm["spatial"], atol=0.51
    )
    widget.start()
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    assert not errors, errors
    types = [str(t) for t in widget.last_result.proportions.columns]
    assert f"stlnmf_{types[0]}" in sdata.tables["table"].obs  # napari-spatialdata can colour
    assert "Added to table 'table'" in widget.status.value
    first = next(  # result layers are named "<spots layer> · <type>"
        layer
        for layer in viewer.layers
        if layer.metadata.get("stlnmf_result", {}).get("cell_type") == types[0]
    )
    assert first.name == f"{spots.name} · {types[0]}"
    k = 3  # a result spot lands on its circle in world coordinates
    instance = widget.last_result.proportions.index[k]
    row = [str(i) for i in spots.metadata["indices"]].index(instance)
    np.testing.assert_allclose(
        first.data_to_world(first.data[k]), spots.data_to_world(spots.data[row]), atol=0.51 * 3.2
    )
