"""Headless GUI tests of the dock widget (pytest-qt + napari's make_napari_viewer, Xvfb)."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest

napari = pytest.importorskip("napari")

from napari_stlnmf.datasets import DEMO_REFERENCE
from napari_stlnmf.layers import (
    DOMINANT_LAYER,
    FIT_ERROR_LAYER,
    MISFIT_LAYER,
    RESULT_TAG,
    TABLE_KEY,
    hover_text,
    ramp_alpha,
    result_layer_name,
    slide_layers,
)

WIDGET = "Deconvolve cell types"


def _dock(viewer):
    _, widget = viewer.window.add_plugin_dock_widget("napari-stlnmf", WIDGET)
    return widget


def _open_sample(viewer, key):
    viewer.open_sample("napari-stlnmf", key)


def _configure(widget, *, train=False, epochs=3):
    widget.train.value = train
    widget.train_epochs.value = epochs


def _wait_done(qtbot, widget, timeout=60_000):
    # ``running`` is cleared by the worker's ``finished`` signal, which arrives (queued)
    # after every progress and ``returned`` signal
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)


def _result_layers(viewer):
    return [layer for layer in viewer.layers if RESULT_TAG in layer.metadata]


def _map(viewer, widget, cell_type):
    """The one proportion map, showing ``cell_type`` as picked in the dock (found by its tag:
    names carry the slide's name)."""
    widget.cell_type_shown.value = cell_type
    return next(
        layer
        for layer in _result_layers(viewer)
        if layer.metadata[RESULT_TAG].get("cell_type") == cell_type
    )


@pytest.fixture
def errors(monkeypatch):
    """Collect the messages the widget shows with show_error."""
    seen = []
    import napari_stlnmf._napari.widget as w

    monkeypatch.setattr(w, "show_error", lambda msg: seen.append(str(msg)))
    return seen


def test_widget_docks_from_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = _dock(viewer)
    assert type(widget).__name__ == "DeconvolveWidget"
    assert widget.spots.value is None
    # shipped parameters by default; fine-tuning is opt-in and brings its epochs with it
    assert widget.train.value is False and not widget.train_epochs.enabled
    widget.train.value = True
    assert widget.train_epochs.enabled
    # every option explains itself: a plain name and a tooltip
    options = [
        widget.spots,
        widget.image,
        widget.reference,
        widget.cell_type_key,
        widget.library_key,
        widget.n_neighbors,
        widget.use_image,
        widget.train,
        widget.train_epochs,
        widget.n_layers,
        widget.seed,
        widget.export_button,
    ]
    for option in options:
        assert option.tooltip, f"{option.label or option.text!r} has no tooltip"
    assert "0 =" not in widget.n_layers.label and "as learned" in widget.n_layers.label
    assert not widget.export_button.enabled  # nothing to export yet


@pytest.mark.parametrize("key", ["demo", "histology"])
def test_samples_open_aligned(make_napari_viewer, key):
    viewer = make_napari_viewer()
    _open_sample(viewer, key)
    image = next(layer for layer in viewer.layers if isinstance(layer, napari.layers.Image))
    spots = next(layer for layer in viewer.layers if isinstance(layer, napari.layers.Points))
    adata = spots.metadata["adata"]
    assert len(spots.data) == adata.n_obs
    assert list(spots.features["barcode"]) == list(adata.obs_names)
    # spots, mapped into image pixels, fall on the image and the scale is 1 / scalefactor
    lib = next(iter(adata.uns["spatial"].values()))
    key_img = "hires" if "hires" in lib["images"] else "lowres"
    scalef = lib["scalefactors"][f"tissue_{key_img}_scalef"]
    np.testing.assert_allclose(image.scale, [1 / scalef, 1 / scalef])
    px = np.array([image.world_to_data(p) for p in spots.data[:50]])
    np.testing.assert_allclose(px[:, ::-1], adata.obsm["spatial"][:50] * scalef, rtol=1e-6)
    assert np.all((px >= 0) & (px < np.array(image.data.shape[:2])))
    np.testing.assert_allclose(spots.size, lib["scalefactors"]["spot_diameter_fullres"])


def test_histology_sample_is_real_image_with_simulated_expression(make_napari_viewer):
    viewer = make_napari_viewer()
    _open_sample(viewer, "histology")
    spots = next(layer for layer in viewer.layers if isinstance(layer, napari.layers.Points))
    adata = spots.metadata["adata"]
    assert adata.n_obs == 4235
    assert "synthetic" in spots.name.lower()  # the cell types are not the tissue's
    truth = adata.obsm["true_proportions"]
    # proportions follow the image regions: region means differ clearly
    by_region = truth.groupby(adata.obs["image_region"].to_numpy()).mean()
    assert (by_region.max() - by_region.min()).max() > 0.3


def test_deconvolve_runs_and_makes_layers(make_napari_viewer, qtbot, errors):
    viewer = make_napari_viewer()
    widget = _dock(viewer)
    _open_sample(viewer, "demo")
    assert widget.spots.value is not None
    assert widget.image.value is not None
    assert str(widget.reference.value) == str(DEMO_REFERENCE)  # sample brings its reference
    assert widget.cell_type_key.value == "cell_type"
    _configure(widget, train=False)

    main = threading.current_thread()
    threads = []
    widget._relay.progressed.connect(lambda *a: threads.append(threading.current_thread()))
    widget.run_button.native.click()  # as a user would
    _wait_done(qtbot, widget)
    assert not errors, errors
    assert threads and all(t is main for t in threads), "progress must arrive in the GUI thread"
    assert widget.progress.value == widget.progress.max

    result = widget.last_result
    types = [str(t) for t in result.proportions.columns]
    names = [layer.name for layer in _result_layers(viewer)]
    slide = "demo (synthetic)"
    # one proportion map (showing the first type), the dominant type, the reference misfit
    # (diagnosis is on by default in the dock), the fit error
    assert widget.diagnose.value and widget._job().kwargs["diagnose"] is True
    # intervals: off by default (about 5x the time), passed on when ticked
    assert widget._job().kwargs["uncertainty"] is False
    widget.uncertainty.value = True
    assert widget._job().kwargs["uncertainty"] is True
    widget.uncertainty.value = False
    assert names == [
        result_layer_name(slide, FIT_ERROR_LAYER),
        result_layer_name(slide, MISFIT_LAYER),
        result_layer_name(slide, DOMINANT_LAYER),
        result_layer_name(slide, types[0]),
    ]
    n_layers = len(viewer.layers)
    assert list(widget.cell_type_shown.choices) == types
    spots_size = viewer.layers[widget.spots.value.name].size[0]
    for t in types:
        layer = _map(viewer, widget, t)  # the picker recolours the same layer
        assert len(viewer.layers) == n_layers and layer.name == result_layer_name(slide, t)
        vals = layer.features[t].to_numpy()
        ok = np.isfinite(vals)
        assert ok.mean() > 0.9
        assert np.all((vals[ok] >= 0) & (vals[ok] <= 1))
        assert np.allclose(layer.size, spots_size)
        assert tuple(layer.face_contrast_limits) == (0.0, 1.0)
        # zero proportion -> transparent, fading in to opaque at 0.3 (H&E shows through)
        alpha = layer.face_color[:, 3]
        assert np.all(alpha[vals == 0] == 0) and np.all(alpha[vals > 0.01] > 0.15)
        assert np.all(alpha[vals >= 0.3] > 0.99)
        np.testing.assert_allclose(alpha[ok], ramp_alpha(vals[ok]), atol=1e-6)
    # the three layers hold one table, the same object
    tables = {id(layer.metadata[TABLE_KEY]) for layer in _result_layers(viewer)}
    assert len(tables) == 1
    feats = _map(viewer, widget, types[0]).features
    sums = feats[types].sum(1).to_numpy()
    assert np.allclose(sums[np.isfinite(sums) & (sums > 0)], 1.0, atol=1e-6)
    assert {"barcode", "dominant", "fit_error", "qc"} <= set(feats.columns)
    # hovering a spot shows its values in the status bar, its largest three types first
    first_map = _map(viewer, widget, types[0])
    status = first_map.get_status(first_map.data[1], world=True)
    assert "barcode" in status["value"] and "dominant" in status["value"]
    shown = status["value"].split("; ", 1)[1]
    assert shown.startswith("top: ")
    row = result.proportions.iloc[1]
    best = row[row > 0].sort_values(ascending=False).index[:3]
    top = shown.split(", ")[0]
    assert [part.split(" ")[0] for part in top.removeprefix("top: ").split(" · ")] == list(best)
    # and the canvas' hover text: the largest types (≥ 1 %) with the table's values
    text = widget.hover_at(first_map.data[1])
    assert text == hover_text(first_map.metadata[TABLE_KEY], 1)
    best5 = row[row >= 0.01].sort_values(ascending=False)[:5]
    assert [line.split("  ")[0] for line in text.split("\n")[1 : 1 + len(best5)]] == list(
        best5.index
    )
    # the maps lie on the spots (same world coordinates as the input)
    np.testing.assert_allclose(first_map.data, widget.spots.value.data)
    # the legend gives the fit error's scale
    fit_layer = next(
        layer for layer in _result_layers(viewer) if layer.name.endswith(FIT_ERROR_LAYER)
    )
    assert f"{fit_layer.face_contrast_limits[1]:.2g}" in widget.legend.value
    # the misfit: its scale in words in the legend, the diagnosis summed up in the dock
    assert "poorly explained" in widget.legend.value and "far off" in widget.legend.value
    flagged = result.diagnostics["poorly_explained"]
    assert widget.diagnosis.value.startswith(f"{flagged.mean():.1%} of spots ({flagged.sum()} of")
    misfit = next(layer for layer in _result_layers(viewer) if layer.name.endswith(MISFIT_LAYER))
    np.testing.assert_allclose(misfit.features["deviance_z"], result.diagnostics["deviance_z"])

    # re-running replaces the previous result layers
    n_before = len(viewer.layers)
    widget.start()
    _wait_done(qtbot, widget)
    assert len(viewer.layers) == n_before
    assert len(_result_layers(viewer)) == 4
    # with the option off: no misfit layer, no summary
    widget.diagnose.value = False
    widget.start()
    _wait_done(qtbot, widget)
    assert MISFIT_LAYER not in " ".join(layer.name for layer in _result_layers(viewer))
    assert widget.diagnosis.value == "" and "far off" not in widget.legend.value


def _start_long_fine_tuning(viewer, qtbot):
    """A run that fine-tunes for 500 epochs, once it is training: (widget, stages seen)."""
    widget = _dock(viewer)
    _open_sample(viewer, "demo")
    _configure(widget, train=True, epochs=500)
    stages = []
    widget._relay.progressed.connect(lambda s, i, n: stages.append(s))
    widget.start()
    assert widget.cancel_button.enabled
    qtbot.waitUntil(lambda: "training" in stages, timeout=180_000)  # slow on a busy machine
    return widget, stages


def test_cancel_stops_worker(make_napari_viewer, qtbot, errors):
    viewer = make_napari_viewer()
    widget, stages = _start_long_fine_tuning(viewer, qtbot)
    widget.cancel()
    _wait_done(qtbot, widget, timeout=120_000)
    assert stages.count("training") < 500
    assert "Cancelled" in widget.status.value
    assert not _result_layers(viewer)
    assert widget.run_button.enabled and not widget.cancel_button.enabled
    assert not errors


def test_bad_reference_shows_error_and_widget_recovers(make_napari_viewer, qtbot, errors, tmp_path):
    viewer = make_napari_viewer()
    widget = _dock(viewer)
    _open_sample(viewer, "demo")
    bad = tmp_path / "signature.csv"
    pd.DataFrame({"gene": ["A", "B"], "x": ["not", "numbers"]}).to_csv(bad, index=False)
    widget.reference.value = bad
    _configure(widget)
    widget.start()
    if widget.worker is not None:
        _wait_done(qtbot, widget)
    assert errors, "a bad reference must show an error notification"
    assert "signature" in errors[-1].lower() or "numeric" in errors[-1].lower()
    # the dock shows the whole message, not only the toast's first ~40 characters
    assert len(errors[-1]) > 40 and errors[-1] in widget.status.value
    assert widget.status.native.wordWrap()
    assert not _result_layers(viewer)
    assert widget.run_button.enabled

    # a reference without the chosen cell-type column fails cleanly too
    errors.clear()
    widget.reference.value = DEMO_REFERENCE
    widget._columns = ["cell_type", "no_such_column"]  # as if the file listed it
    widget.cell_type_key.reset_choices()
    widget.cell_type_key.value = "no_such_column"
    widget.start()
    _wait_done(qtbot, widget)
    assert errors and "no_such_column" in errors[-1]

    # the widget is still usable
    errors.clear()
    widget.cell_type_key.value = "cell_type"
    widget.start()
    _wait_done(qtbot, widget)
    assert not errors, errors
    assert _result_layers(viewer)
    assert widget.status.value.startswith("Done in")

    # an error before the run starts replaces the last run's "Done in …"
    widget.reference.value = ""
    widget.start()
    assert errors and "reference" in errors[-1].lower()
    assert "Done" not in widget.status.value and errors[-1] in widget.status.value


@pytest.mark.parametrize("closing", ["dock", "viewer"])
def test_closing_mid_run_cancels_cleanly(make_napari_viewer, qtbot, errors, closing):
    viewer = make_napari_viewer()
    widget, stages = _start_long_fine_tuning(viewer, qtbot)
    if closing == "dock":
        viewer.window.remove_dock_widget(widget.native)  # what the dock's close button does
    else:
        viewer.close()
    assert widget.closed
    # the worker stops at its next checkpoint; its late signals touch no deleted Qt object
    # (pytest-qt fails the test on any exception raised in a Qt callback)
    qtbot.waitUntil(lambda: not widget.running, timeout=30_000)
    qtbot.wait(200)
    assert stages.count("training") < 500
    assert not _result_layers(viewer)
    assert not errors
    if closing == "dock":  # the viewer lives on: adding layers no longer calls the widget
        viewer.add_points(np.zeros((1, 2)))


def test_export_button_writes_the_table_by_barcode(make_napari_viewer, qtbot, errors, tmp_path):
    viewer = make_napari_viewer()
    widget = _dock(viewer)
    _open_sample(viewer, "demo")
    _configure(widget)
    widget.start()
    _wait_done(qtbot, widget)
    assert widget.export_button.enabled
    viewer.layers.selection.active = widget.spots.value  # not a result layer: the last run's
    written = widget.export_results(tmp_path / "proportions.csv")
    assert written == [str(tmp_path / "proportions.csv")]
    table = pd.read_csv(written[0], index_col="barcode")
    result = widget.last_result
    assert list(table.index) == list(result.proportions.index)
    np.testing.assert_allclose(
        table[result.proportions.columns].to_numpy(), result.proportions.to_numpy(), atol=1e-5
    )
    assert "top" not in table.columns  # the hover text is not data
    assert [p.name for p in tmp_path.iterdir()] == ["proportions.csv"]  # no partial file left
    h5 = widget.export_results(tmp_path / "result.h5ad")
    assert h5 and (tmp_path / "result.h5ad").is_file()
    assert "Exported" in widget.status.value and not errors


def test_sample_column_is_offered_and_passed_as_library_key(make_napari_viewer, errors):
    from napari_stlnmf.datasets import load_demo

    slide, _ = load_demo()
    lib = next(iter(slide.uns["spatial"].values()))
    slide.uns["spatial"] = {"sec1": lib, "sec2": lib}
    half = np.arange(slide.n_obs) < slide.n_obs // 2
    slide.obs["section"] = pd.Categorical(np.where(half, "sec1", "sec2"))
    viewer = make_napari_viewer()
    widget = _dock(viewer)
    assert widget.library_key.choices == ("",)  # no slide: only 'none'
    for data, kwargs, kind in slide_layers(slide, name="two sections", reference=DEMO_REFERENCE):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    assert "section" in widget.library_key.choices
    assert widget.library_key.value == ""  # default: one fit for all spots
    assert widget._job().kwargs["library_key"] is None
    widget.library_key.value = "section"
    assert widget._job().kwargs["library_key"] == "section"


def test_no_spots_layer_is_a_clear_error(make_napari_viewer, errors):
    viewer = make_napari_viewer()
    widget = _dock(viewer)
    widget.start()
    assert errors and "spots" in errors[-1].lower()
    assert widget.worker is None


def test_screenshot_shows_map_over_image(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1200, 800)
    widget = _dock(viewer)
    _open_sample(viewer, "histology")
    image_layer = next(layer for layer in viewer.layers if isinstance(layer, napari.layers.Image))
    _configure(widget)
    widget.start()
    _wait_done(qtbot, widget, timeout=90_000)
    assert _result_layers(viewer)
    first = widget.last_result.proportions.mean().idxmax()  # the most abundant type
    # picked first: the dock's text may change the window's layout, and so the canvas' size
    first_map = _map(viewer, widget, first)
    qtbot.wait(100)
    for layer in viewer.layers:  # the image alone, then one map over it
        layer.visible = layer is image_layer
    viewer.reset_view()
    qtbot.wait(100)
    before = viewer.screenshot(canvas_only=True)
    first_map.visible = True
    qtbot.wait(100)
    after = viewer.screenshot(canvas_only=True)
    from PIL import Image

    Image.fromarray(np.asarray(after[..., :3], dtype=np.uint8)).save(tmp_path / "map.png")
    assert after.ndim == 3 and after.shape[-1] in (3, 4)
    rgb = after[..., :3].astype(float)
    assert rgb.std() > 10, "screenshot looks blank"
    # the map changes the picture where the spots are, and adds colours the H&E lacks;
    # measured on the image's footprint (the canvas' black margins depend on the window's
    # shape, which the dock's height changes)
    diff = np.abs(rgb - before[..., :3].astype(float)).sum(-1)
    on_image = before[..., :3].astype(float).sum(-1) > 0
    assert (diff[on_image] > 30).mean() > 0.05
    # viridis (green/teal/yellow: G well above R) where the map is; H&E is pink/purple/grey
    base = before[..., :3].astype(float)
    viridis_like = (rgb[..., 1] > rgb[..., 0] + 30) & (diff > 30)
    assert viridis_like.mean() > 0.005, "no viridis colours found in the screenshot"
    assert (base[..., 1] > base[..., 0] + 30).mean() < 0.2 * viridis_like.mean()


def test_open_slide_file_from_widget(make_napari_viewer, errors, tmp_path):
    from napari_stlnmf.datasets import load_demo

    slide, _ = load_demo()
    slide.write_h5ad(tmp_path / "my_slide.h5ad")
    viewer = make_napari_viewer()
    widget = _dock(viewer)
    widget.slide_file.value = tmp_path / "my_slide.h5ad"
    assert not errors, errors
    assert widget.spots.value is not None and widget.spots.value.name == "my_slide spots"
    assert widget.image.value is not None and widget.image.value.name == "my_slide image"
    widget.slide_file.value = tmp_path / "missing.h5ad"
    assert errors  # a clear message, no exception


def test_open_visium_hd_folder_at_a_bin_size(make_napari_viewer, errors, tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "io"))
    from hd_testdata import MICRONS_PER_PIXEL, make_visium_hd

    counts = np.random.default_rng(0).poisson(1.0, size=(16 * 16, 5))
    hd = make_visium_hd(tmp_path, counts, [f"g{i}" for i in range(5)], grid=(16, 16))
    viewer = make_napari_viewer()
    widget = _dock(viewer)
    widget.bin_size.value = 16
    widget.slide_folder.value = hd.outs
    assert not errors, errors
    spots = widget.spots.value
    assert spots is not None and spots.name == "hd_sample 16 µm spots"
    assert len(spots.data) == len(hd.counts[16])
    assert str(spots.symbol[0]) == "square"
    np.testing.assert_allclose(spots.size, 16 / MICRONS_PER_PIXEL)
    assert widget.image.value is not None  # the bins' own tissue image, pre-selected
    widget.bin_size.value = 4  # not written by Space Ranger here: the message lists 2, 8, 16
    widget.slide_folder.value = hd.sample
    assert errors and "2, 8, 16" in errors[-1]
