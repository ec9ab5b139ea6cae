"""Results as few layers sharing one table; Visium HD bins as the pixels of their grid
(napari_stlnmf.result_rasters, napari_stlnmf.layers). Headless: no napari, no Qt."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from napari_stlnmf.layers import (
    BINS_KEY,
    INDEX_KEY,
    RESULT_TAG,
    TABLE_KEY,
    dominant_label_colors,
    hover_text,
    ramp_alpha,
    ramp_colormap,
    result_layers,
)
from napari_stlnmf.result_rasters import bin_grid, index_raster, raster

MPP = 0.2738  # µm per full-resolution pixel (a real Visium HD value)
BIN_UM = 8.0


def _rotation(deg):
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


def _hd_slide(shape=(30, 40), *, deg=0.0, drop=0.3, seed=0, types=20, with_array=True):
    """An HD-like slide of 8 µm bins: a (slightly rotated) grid with bins missing (off the
    tissue), positions in full-resolution pixels as Space Ranger writes them."""
    rng = np.random.default_rng(seed)
    r, c = np.divmod(np.arange(shape[0] * shape[1]), shape[1])
    keep = rng.random(r.size) > drop
    r, c = r[keep], c[keep]
    side = BIN_UM / MPP
    yx = (np.column_stack([r, c]) * side) @ _rotation(deg).T + np.array([900.0, 1500.0])
    obs = pd.DataFrame(index=[f"s_008um_{a:05d}_{b:05d}-1" for a, b in zip(r, c)])
    if with_array:
        obs["array_row"], obs["array_col"] = r + 7, c + 3  # need not start at 0
    slide = ad.AnnData(np.zeros((len(r), 2), np.float32), obs=obs)
    slide.obsm["spatial"] = yx[:, ::-1].copy()
    scalefactors = {"bin_size_um": BIN_UM, "microns_per_pixel": MPP}
    slide.uns["spatial"] = {"hd": {"images": {}, "scalefactors": scalefactors, "metadata": {}}}
    values = rng.dirichlet(np.full(types, 0.3), size=len(r))
    values[values < 0.02] = 0.0
    values /= values.sum(1, keepdims=True)
    values[5] = np.nan  # a bin without an estimate
    prop = pd.DataFrame(
        values, index=slide.obs_names, columns=[f"type{i:02d}" for i in range(types)]
    )
    fit = pd.Series(rng.random(len(r)), index=slide.obs_names)
    return slide, prop, fit, (r, c)


def _apply(affine, rc):
    rc = np.atleast_2d(np.asarray(rc, dtype=float))
    return rc @ affine[:2, :2].T + affine[:2, 2]


@pytest.mark.parametrize("deg", [0.0, 0.6])
@pytest.mark.parametrize("with_array", [True, False])
def test_bin_grid_puts_every_bin_on_its_pixel(deg, with_array):
    slide, _, _, (r, c) = _hd_slide(deg=deg, with_array=with_array)
    yx = slide.obsm["spatial"][:, ::-1]
    rows = slide.obs["array_row"] if with_array else None
    cols = slide.obs["array_col"] if with_array else None
    side = BIN_UM / MPP
    if deg and not with_array:  # rounding a rotated grid's positions is not safe: refused
        grid = bin_grid(yx, side)
        assert (
            grid is None
            or np.abs(_apply(grid.affine, np.c_[grid.rows, grid.cols]) - yx).max() < side / 4
        )
        return
    grid = bin_grid(yx, side, array_rows=rows, array_cols=cols)
    assert grid is not None
    np.testing.assert_array_equal(grid.rows, r - r.min())
    np.testing.assert_array_equal(grid.cols, c - c.min())
    # pixel (row, col) of the grid maps to the bin's centre; a pixel is one bin wide
    np.testing.assert_allclose(_apply(grid.affine, np.c_[grid.rows, grid.cols]), yx, atol=1e-6)
    np.testing.assert_allclose(np.abs(np.linalg.det(grid.affine[:2, :2])), side**2, rtol=1e-9)
    values = np.arange(grid.n_bins, dtype=float)
    image = raster(grid, values)
    assert image.dtype == np.float32 and image.shape == grid.shape
    np.testing.assert_array_equal(image[grid.rows, grid.cols], values)
    assert np.isnan(image).sum() == image.size - grid.n_bins  # NaN off the bins
    index = index_raster(grid)
    np.testing.assert_array_equal(index[grid.rows, grid.cols], np.arange(grid.n_bins))
    assert (index < 0).sum() == image.size - grid.n_bins


def test_bin_grid_refuses_what_is_no_grid():
    rng = np.random.default_rng(1)
    scattered = rng.uniform(0, 1000, size=(200, 2))  # cells, not bins
    assert bin_grid(scattered, 29.2) is None
    dup = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 29.2]])
    assert bin_grid(dup, 29.2) is None  # two bins on one pixel
    assert bin_grid(np.zeros((0, 2)), 29.2) is None
    assert bin_grid(np.zeros((3, 2)), 0.0) is None
    with pytest.raises(ValueError, match="values for"):
        raster(bin_grid(np.array([[0.0, 0.0], [0.0, 29.2]]), 29.2), [1.0])


def test_hd_results_are_three_rasters_sharing_one_table():
    slide, prop, fit, _ = _hd_slide()
    layers = result_layers(prop, fit, None, slide, slide_name="hd")
    assert [kind for _, _, kind in layers] == ["image", "labels", "image"]
    metas = [kw["metadata"] for _, kw, _ in layers]
    table = metas[0][TABLE_KEY]
    assert all(m[TABLE_KEY] is table for m in metas)  # one object, not copies
    assert all(m[BINS_KEY] is metas[0][BINS_KEY] for m in metas)
    assert [m[RESULT_TAG]["role"] for m in metas] == ["fit_error", "dominant", "cell_type"]
    assert layers[-1][1]["name"] == "hd · type00"
    assert list(table["barcode"]) == list(slide.obs_names)
    grid = metas[0][BINS_KEY]
    fit_img, labels, shown = (data for data, _, _ in layers)
    for data in (fit_img, labels, shown):
        assert data.shape == grid.shape
    # each bin's pixel holds its values (0, transparent, for the bin without an estimate)
    np.testing.assert_allclose(
        shown[grid.rows, grid.cols], np.nan_to_num(prop["type00"].to_numpy()), rtol=1e-6
    )
    np.testing.assert_allclose(fit_img[grid.rows, grid.cols], fit.to_numpy(), rtol=1e-6)
    assert shown.dtype == np.float32 and fit_img.dtype == np.float32
    dom = labels[grid.rows, grid.cols]
    best = np.nanargmax(np.nan_to_num(prop.to_numpy(), nan=-1), axis=1) + 1
    expected = np.where(np.isnan(prop.to_numpy()).any(1), 0, best)
    np.testing.assert_array_equal(dom, expected)
    # the labels' colours are the dominant types', 0 transparent
    colors = layers[1][1]["colormap"]
    assert colors[0] == "transparent" and len(colors) == prop.shape[1] + 2
    # placed by the affine: pixel (row, col) of a bin lies on its barcode's coordinates
    affine = layers[-1][1]["affine"]
    k = 17
    np.testing.assert_allclose(
        _apply(affine, [grid.rows[k], grid.cols[k]])[0], slide.obsm["spatial"][k, ::-1]
    )
    assert metas[0][INDEX_KEY][grid.rows[k], grid.cols[k]] == k
    # the layer data: a few images of the grid, not one table copy per type
    table_bytes = prop.to_numpy().nbytes
    raster_bytes = sum(d.nbytes for d, _, _ in layers) + metas[0][INDEX_KEY].nbytes
    assert raster_bytes < table_bytes


def test_round_spots_stay_points_with_one_shared_table(demo):
    slide, _ = demo
    rng = np.random.default_rng(0)
    types = [f"t{i}" for i in range(12)]
    prop = pd.DataFrame(
        rng.dirichlet(np.ones(12), size=slide.n_obs), index=slide.obs_names, columns=types
    )
    layers = result_layers(prop, None, None, slide, slide_name="demo")
    assert [kind for _, _, kind in layers] == ["points"] * 3  # not 12 + 2
    tables = [kw["metadata"][TABLE_KEY] for _, kw, _ in layers]
    assert all(t is tables[0] for t in tables)
    assert all(kw["features"] is tables[0] for _, kw, _ in layers)
    assert layers[-1][1]["face_color"] == "t0" and layers[-1][1]["name"] == "demo · t0"
    assert result_layers(prop, None, None, slide, shown="t3")[-1][1]["face_color"] == "t3"
    # an HD slide can still be drawn as Points on request
    hd, hprop, hfit, _ = _hd_slide(shape=(6, 6))
    kinds = [k for _, _, k in result_layers(hprop, hfit, None, hd, rasterise=False)]
    assert kinds == ["points"] * 3


def test_proportion_colormap_fades_in_over_the_image():
    cmap = ramp_colormap()
    assert cmap["controls"][0] == 0.0 and cmap["colors"][0][3] == 0.0  # 0: transparent
    v = np.array([0.0, 0.01, 0.1, 0.2, 0.3, 0.6, 1.0])
    alpha = ramp_alpha(v)
    assert alpha[0] == 0.0 and 0 < alpha[1] < 0.3
    assert np.all(np.diff(alpha) >= 0) and np.all(alpha[v >= 0.3] == 1.0)
    # the colormap's own alpha at its controls is the same ramp
    np.testing.assert_allclose(cmap["colors"][:, 3], ramp_alpha(cmap["controls"]))


def test_hover_text_lists_the_largest_types_with_the_table_values():
    slide, prop, fit, _ = _hd_slide(types=25)
    layers = result_layers(prop, fit, None, slide)
    table = layers[0][1]["metadata"][TABLE_KEY]
    k = 3
    text = hover_text(table, k)
    lines = text.split("\n")
    assert lines[0] == slide.obs_names[k]
    row = prop.iloc[k]
    best = row[row >= 0.01].sort_values(ascending=False)
    shown = [line.rsplit("  ", 1) for line in lines[1:] if line.startswith("type")]
    assert [name for name, _ in shown] == list(best.index[:5])  # top 5, largest first
    for name, value in shown:
        assert float(value.rstrip("%")) == pytest.approx(100 * row[name], abs=0.05)
    if len(best) > 5:
        assert f"… {len(best) - 5} more" in text
    assert f"fit error  {fit.iloc[k]:.3g}" in text
    assert "no estimate" in hover_text(table, 5)
    assert hover_text(table, None) == "" and hover_text(table, len(table)) == ""


def test_dominant_label_colors_number_the_types_from_one():
    colors = dominant_label_colors(["a", "b", "c"])
    assert colors[0] == colors[None] == "transparent"
    assert set(colors) == {0, None, 1, 2, 3} and colors[1] != colors[2]
