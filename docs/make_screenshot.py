"""Make docs/screenshot.png (the dock widget and a cell-type map over the real H&E sample),
docs/screenshot_dominant.png and docs/screenshot_misfit.png (the reference misfit with one
type held out of the reference: where that type lived lights up, the dock names its genes).

Run headless with:
    xvfb-run -a -s "-screen 0 1400x900x24" .venv/bin/python docs/make_screenshot.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

OUT = Path(__file__).resolve().parent
HELD_OUT = "immune"  # left out of the reference for the misfit screenshot


def _results(viewer) -> dict:
    """The result layers by role (``cell_type``, ``dominant``, ``misfit``, ``fit_error``)."""
    return {
        layer.metadata["stlnmf_result"]["role"]: layer
        for layer in viewer.layers
        if "stlnmf_result" in layer.metadata
    }


def _process(ms: int = 300) -> None:
    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    QTimer.singleShot(ms, loop.quit)
    loop.exec()


def main(train: bool = False) -> int:
    viewer = napari.Viewer(title="napari-stlnmf")
    viewer.window.resize(1380, 860)
    _, widget = viewer.window.add_plugin_dock_widget("napari-stlnmf", "Deconvolve cell types")
    viewer.open_sample("napari-stlnmf", "histology")
    widget.train.value = train
    widget.train_epochs.value = 40
    widget.start()
    while widget.running:
        QApplication.processEvents()
        _process(100)
    result = widget.last_result
    if result is None:
        print(widget.status.value, file=sys.stderr)
        return 1
    # the most abundant type on top, over the H&E (layers found by role: "<slide> · <type>")
    show = str(result.proportions.mean().idxmax())
    widget.cell_type_shown.value = show
    results = _results(viewer)
    for layer in results.values():
        layer.visible = layer is results["cell_type"]
    viewer.layers.selection.active = results["cell_type"]
    viewer.reset_view()
    # zoom on the tissue so spots are visible
    viewer.camera.zoom *= 1.35
    _process(500)
    overlay = viewer.text_overlay
    overlay.visible = True
    overlay.position = "top_left"
    overlay.font_size = 9
    overlay.color = "white"
    overlay.text = (
        f"{show}: share of cells per spot (viridis, 0 -> 1)\n"
        "real H&E + spot layout; SYNTHETIC expression and cell types"
    )
    _process(300)
    viewer.screenshot(str(OUT / "screenshot.png"), canvas_only=False)
    for layer in results.values():
        layer.visible = layer is results["dominant"]
    overlay.text = "dominant cell type (legend in the dock widget)"
    _process(300)
    viewer.screenshot(str(OUT / "screenshot_dominant.png"), canvas_only=True)

    # a type missing from the reference: the misfit layer finds where it lived
    import anndata as ad

    reference = ad.read_h5ad(widget.reference.value)
    key = widget.cell_type_key.value
    held_out = HELD_OUT
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"reference_without_{held_out}.h5ad"
        reference[reference.obs[key].astype(str) != held_out].copy().write_h5ad(path)
        widget.reference.value = path
        widget.cell_type_key.value = key
        widget.start()
        while widget.running:
            QApplication.processEvents()
            _process(100)
    results = _results(viewer)
    for layer in results.values():
        layer.visible = layer is results["misfit"]
    viewer.layers.selection.active = results["misfit"]
    overlay.text = (
        f"reference misfit with '{held_out}' left out of the reference\n"
        "orange/red: poorly explained (z >= 3); summary in the dock"
    )
    _process(500)
    viewer.screenshot(str(OUT / "screenshot_misfit.png"), canvas_only=False)
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(
        main(train="--train" in sys.argv)
    )  # the default run, as a user clicking Deconvolve gets it
