"""napari_stlnmf.io.library: libraries, images, spot diameter and image checks."""

from __future__ import annotations

import copy

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from io_testdata import small_slide

from napari_stlnmf import io
from napari_stlnmf.errors import ImageMismatchError, StlnmfError


def test_libraries_and_image_checks():
    adata = small_slide(dense=True)
    assert io.get_image(adata) is None
    io.check_image_covers_spots(adata)  # nothing to check without an image
    with pytest.raises(StlnmfError, match="uns\\['spatial'\\]"):
        io.get_library(adata)

    image = np.zeros((10, 20, 3), dtype=np.uint8)
    adata.obsm["spatial"] = np.array([[0, 0], [100, 0], [0, 50], [190, 95]], dtype=float)
    lib = {"images": {"hires": image}, "scalefactors": {"tissue_hires_scalef": 0.1}}
    adata.uns["spatial"] = {"one": lib, "two": copy.deepcopy(lib)}
    with pytest.raises(StlnmfError, match="'one', 'two'"):
        io.get_library(adata)
    with pytest.raises(StlnmfError, match="'one', 'two'"):
        io.check_image_covers_spots(adata)
    with pytest.raises(StlnmfError, match="'three'"):
        io.get_library(adata, "three")
    assert io.get_library(adata, "two")[0] == "two"
    io.check_image_covers_spots(adata, library_id="one")

    adata.uns["spatial"]["two"]["scalefactors"]["tissue_hires_scalef"] = 0.2
    with pytest.raises(ImageMismatchError, match=r"scale factor 0\.2.*20 x 10 px"):
        io.check_image_covers_spots(adata, library_id="two", image_key="hires")
    with pytest.raises(ImageMismatchError, match="'lowres'"):
        io.check_image_covers_spots(adata, library_id="one", image_key="lowres")
    assert io.get_image(adata, "one", prefer=("lowres",)) is None
    img, scalef, diameter = io.get_image(adata, "one")
    assert img.shape == (10, 20, 3) and scalef == 0.1 and diameter is None


# --------------------------------------------------------------------------- #
# spot diameter: one source for the napari layers, the PNG maps and the readers
# --------------------------------------------------------------------------- #


def _hex_slide(pitch: float, *, diameter: float | None, image: bool) -> ad.AnnData:
    from napari_stlnmf.datasets import hex_layout

    xy = hex_layout(4, 5, pitch=pitch)
    adata = ad.AnnData(
        X=np.ones((len(xy), 2), dtype=np.float32),
        obs=pd.DataFrame(index=[f"s{i}" for i in range(len(xy))]),
    )
    adata.obsm["spatial"] = xy
    scalefactors = {} if diameter is None else {"spot_diameter_fullres": diameter}
    images = {}
    if image:
        images["hires"] = np.zeros((200, 300, 3), dtype=np.uint8)
        scalefactors["tissue_hires_scalef"] = 0.1
    adata.uns["spatial"] = {"lib": {"images": images, "scalefactors": scalefactors}}
    return adata


def test_spot_diameter_stored_estimated_and_single_spot():
    assert io.spot_diameter(_hex_slide(100.0, diameter=55.0, image=True)) == 55.0
    estimated = _hex_slide(100.0, diameter=None, image=True)
    assert io.spot_diameter(estimated) == pytest.approx(io.SPOT_DIAMETER_PER_SPACING * 100.0)
    assert io.spot_diameter(estimated, estimate=False) is None
    assert io.spot_diameter(_hex_slide(100.0, diameter=0.0, image=False)) == pytest.approx(55.0)
    no_library = _hex_slide(10.0, diameter=None, image=False)
    del no_library.uns["spatial"]
    assert io.spot_diameter(no_library) == pytest.approx(5.5)
    assert io.spot_diameter(no_library[:1].copy()) == 1.0
    with_nan = no_library.copy()
    with_nan.obsm["spatial"][0] = np.nan  # the other spots still give the spacing
    assert io.spot_diameter(with_nan) == pytest.approx(5.5)
    assert io.estimate_spot_diameter(np.zeros((5, 2))) is None  # one position shared by all


@pytest.mark.parametrize(
    ("diameter", "image"),
    [(55.0, True), (None, True), (40.0, False), (None, False)],
    ids=["stored", "estimated", "stored_no_image", "estimated_no_image"],
)
def test_png_maps_and_napari_layers_draw_the_same_spot_size(diameter, image):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from napari_stlnmf.layers import result_layers, slide_layers
    from napari_stlnmf.plotting import draw_spot_map, map_background

    adata = _hex_slide(100.0, diameter=diameter, image=image)
    expected = io.spot_diameter(adata)
    points = slide_layers(adata)[-1]
    assert points[2] == "points" and points[1]["size"] == pytest.approx(expected)
    props = pd.DataFrame({"a": 0.5, "b": 0.5}, index=adata.obs_names)
    for _, kwargs, _ in result_layers(props, None, None, adata):
        assert kwargs["size"] == pytest.approx(expected)

    _, scalef, _ = map_background(adata)
    fig, ax = plt.subplots()
    try:
        circles = draw_spot_map(ax, adata, props["a"].to_numpy(), cmap="viridis", vmin=0, vmax=1)
        # image pixels in the PNG, full-resolution pixels (world units) in napari
        np.testing.assert_allclose(circles.get_widths() / scalef, expected)
    finally:
        plt.close(fig)
