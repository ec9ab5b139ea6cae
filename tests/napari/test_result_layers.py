"""The result layers in a real (headless) napari: Visium HD bins as rasters aligned with the
slide, the dock's cell-type picker recolouring one layer, hover text from the shared table,
the writer offered for and exporting from raster layers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

napari = pytest.importorskip("napari")

from test_result_rasters import _hd_slide

from napari_stlnmf._napari.widget import text_overlay
from napari_stlnmf.layers import (
    BINS_KEY,
    RESULT_TAG,
    TABLE_KEY,
    hover_text,
    result_layers,
)

WIDGET = "Deconvolve cell types"


def _dock(viewer):
    _, widget = viewer.window.add_plugin_dock_widget("napari-stlnmf", WIDGET)
    return widget


def _add(viewer, layers):
    return [getattr(viewer, f"add_{kind}")(data, **kw) for data, kw, kind in layers]


def _hd_folder_slide(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "io"))
    from hd_testdata import make_visium_hd

    from napari_stlnmf._napari.reader import read_slide_layers

    counts = np.random.default_rng(0).poisson(1.0, size=(24 * 32, 5))
    hd = make_visium_hd(tmp_path, counts, [f"g{i}" for i in range(5)], grid=(24, 32))
    return read_slide_layers(hd.outs, bin_size=8)


def _proportions(slide, n_types=6, seed=0):
    rng = np.random.default_rng(seed)
    values = rng.dirichlet(np.full(n_types, 0.5), size=slide.n_obs)
    types = [f"type{i}" for i in range(n_types)]
    return pd.DataFrame(values, index=slide.obs_names.astype(str), columns=types)


def test_hd_raster_lies_under_its_bins_and_the_tissue_image(
    make_napari_viewer, tmp_path, monkeypatch
):
    viewer = make_napari_viewer()
    slide_layers = _hd_folder_slide(tmp_path, monkeypatch)
    image, spots = _add(viewer, slide_layers)
    adata = spots.metadata["adata"]
    prop = _proportions(adata)
    fit = pd.Series(np.linspace(0.1, 0.5, adata.n_obs), index=prop.index)
    results = _add(viewer, result_layers(prop, fit, None, adata, slide_name="hd"))
    assert [type(layer).__name__ for layer in results] == ["Image", "Labels", "Image"]
    shown = results[-1]
    table = shown.metadata[TABLE_KEY]
    for k in range(adata.n_obs):
        world = spots.data_to_world(spots.data[k])  # the barcode's coordinates
        for layer in results:
            r, c = np.rint(layer.world_to_data(world)).astype(int)
            grid = layer.metadata[BINS_KEY]
            assert (r, c) == (grid.rows[k], grid.cols[k])
        r, c = np.rint(shown.world_to_data(world)).astype(int)
        assert shown.data[r, c] == pytest.approx(table["type0"].iloc[k], rel=1e-6)
        # and the same world point is on the tissue image, where the spot is
        px = np.asarray(image.world_to_data(world))
        assert np.all(px >= 0) and np.all(px < np.array(image.data.shape[:2]))
    # a pixel is one bin: its world extent equals the bin's side
    side = float(spots.size[0])
    corners = np.array([shown.data_to_world(p) for p in ([0, 0], [0, 1], [1, 0])])
    np.testing.assert_allclose(np.linalg.norm(corners[1:] - corners[0], axis=1), side, rtol=1e-6)


def test_rotated_grid_raster_aligns_in_world_space(make_napari_viewer):
    viewer = make_napari_viewer()
    slide, prop, fit, _ = _hd_slide(shape=(20, 25), deg=0.8, types=8)
    layers = _add(viewer, result_layers(prop, fit, None, slide))
    yx = slide.obsm["spatial"][:, ::-1]
    grid = layers[-1].metadata[BINS_KEY]
    for k in range(0, slide.n_obs, 7):
        r, c = np.rint(layers[-1].world_to_data(yx[k])).astype(int)
        assert (r, c) == (grid.rows[k], grid.cols[k])


@pytest.mark.parametrize("kind", ["bins", "spots"])
def test_picker_recolours_the_one_map_and_hover_reads_the_table(make_napari_viewer, kind, demo):
    viewer = make_napari_viewer()
    widget = _dock(viewer)
    if kind == "bins":
        slide, prop, fit, _ = _hd_slide(shape=(30, 30), types=20)
    else:
        slide, _ = demo
        prop, fit = _proportions(slide, n_types=8), None
    results = _add(viewer, result_layers(prop, fit, None, slide, slide_name="s"))
    shown = results[-1]
    types = list(prop.columns)
    assert widget.cell_type_shown.enabled
    assert list(widget.cell_type_shown.choices) == types
    assert widget.cell_type_shown.value == types[0]
    n_layers = len(viewer.layers)
    for t in (types[3], types[-1], types[0]):
        before = shown.data.copy() if kind == "bins" else shown.face_color.copy()
        widget.cell_type_shown.value = t
        assert len(viewer.layers) == n_layers  # no layer added or removed
        assert viewer.layers[-1] is shown and shown.name == f"s · {t}"
        assert shown.metadata[RESULT_TAG]["cell_type"] == t
        values = prop[t].to_numpy()
        if kind == "bins":
            grid = shown.metadata[BINS_KEY]
            # no estimate (NaN in the table): 0, drawn transparent
            np.testing.assert_allclose(
                shown.data[grid.rows, grid.cols], np.nan_to_num(values), rtol=1e-6
            )
            assert not np.array_equal(before, shown.data)
        else:
            alpha = shown.face_color[:, 3]
            assert np.all(alpha[values == 0] == 0) and np.all(alpha[values >= 0.3] > 0.99)
            assert not np.array_equal(before, shown.face_color)
    # the three layers share one table object
    assert len({id(layer.metadata[TABLE_KEY]) for layer in results}) == 1
    # hover: the spot's/bin's largest types with the table's values, on the canvas
    table = shown.metadata[TABLE_KEY]
    yx = slide.obsm["spatial"][:, ::-1]
    for k in (1, 10, 42):
        text = widget.hover_at(yx[k])
        assert text == hover_text(table, k) and text.split("\n")[0] == slide.obs_names[k]
        row = prop.iloc[k]
        best = row[row >= 0.01].sort_values(ascending=False).index[:5]
        assert [line.split("  ")[0] for line in text.split("\n")[1 : 1 + len(best)]] == list(best)
    widget._on_mouse_move(viewer, SimpleNamespace(position=tuple(yx[10])))
    overlay = text_overlay(viewer)
    assert overlay.visible and overlay.text == hover_text(table, 10)
    far = tuple(yx.max(0) + 1e5)
    widget._on_mouse_move(viewer, SimpleNamespace(position=far))
    assert not overlay.visible


def test_show_result_turns_on_the_colour_bar_and_legend(make_napari_viewer):
    from napari_stlnmf._napari.widget import Job

    viewer = make_napari_viewer()
    widget = _dock(viewer)
    slide, prop, fit, _ = _hd_slide(shape=(12, 12), types=5)
    result = SimpleNamespace(
        proportions=prop, fit_error=fit, qc=None, adata=slide, info={"seconds": 1.0}
    )
    widget._show_result(result, Job(slide=slide, reference="", source="x", slide_name="hd"))
    results = [layer for layer in viewer.layers if RESULT_TAG in layer.metadata]
    assert len(results) == 3
    shown = results[-1]
    assert isinstance(shown, napari.layers.Image) and shown.colorbar.visible
    hi = shown.metadata[RESULT_TAG]["fit_error_max"]
    assert f"{hi:.2g}" in widget.legend.value and "fading in" in widget.legend.value
    assert widget.cell_type_shown.value == prop.columns[0]


def test_writer_is_offered_for_raster_layers_and_exports_the_table(make_napari_viewer, tmp_path):
    from napari.plugins._npe2 import file_extensions_string_for_layers

    viewer = make_napari_viewer()
    slide, prop, fit, _ = _hd_slide(shape=(10, 10), types=4)
    results = _add(viewer, result_layers(prop, fit, None, slide, annotated=None))
    for layer in results:  # each raster alone, then all three
        _, writers = file_extensions_string_for_layers([layer])
        assert "napari-stlnmf" in [w.plugin_name for w in writers]
    viewer.layers.selection = set(results)
    csv = tmp_path / "bins.csv"
    assert viewer.layers.save(str(csv), selected=True, plugin="napari-stlnmf") == [str(csv)]
    table = pd.read_csv(csv, index_col="barcode")
    assert list(table.index) == list(slide.obs_names)
    np.testing.assert_allclose(
        table[prop.columns].to_numpy(), prop.to_numpy(), rtol=1e-5, atol=1e-6, equal_nan=True
    )
    np.testing.assert_allclose(table["fit_error"].to_numpy(), fit.to_numpy(), rtol=1e-5)
    h5 = tmp_path / "bins.h5ad"
    viewer.layers.selection = {results[0]}
    viewer.layers.save(str(h5), selected=True, plugin="napari-stlnmf")
    import anndata as ad

    back = ad.read_h5ad(h5)
    np.testing.assert_allclose(back.obsm["spatial"], slide.obsm["spatial"])
