"""Dock widget: deconvolve the spots of a slide in napari and show cell-type maps.

UI only. The compute is :func:`napari_stlnmf.deconvolve`, run in a napari ``thread_worker``;
its ``progress(stage, i, n)`` callback is relayed to the GUI thread by a Qt signal (queued
across threads) and Cancel sets a flag read by ``should_stop``. Results become layers via
:mod:`napari_stlnmf._layers`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import napari  # real import: npe2 resolves the ``viewer`` annotation at run time
import napari.layers
import napari.viewer
import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
)
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QComboBox

from ..errors import StlnmfError
from ..layers import (
    DOMINANT_LAYER,
    RESULT_TAG,
    SLIDE_TAG,
    dominant_colors,
    image_for_features,
    is_spatialdata_layer,
    layer_to_world,
    result_layers,
    slide_for_deconvolution,
    slide_on_image,
    spots_from_spatialdata_layer,
    write_results_to_spatialdata_layer,
)
from ..progress import stage_label

__all__ = ["DeconvolveWidget", "run_deconvolution"]

_REFERENCE_FILTER = "*.h5ad *.csv *.tsv *.txt *.csv.gz *.tsv.gz *.txt.gz"


@dataclass
class Job:
    """Everything one run needs (built in the GUI thread, used in the worker)."""

    slide: object
    reference: str
    kwargs: dict = field(default_factory=dict)
    source: str = ""
    spots_name: str = ""
    spatialdata_layer: object = None  # napari-spatialdata's spots: results go into its table


def run_deconvolution(job: Job, progress=None, should_stop=None):
    """Run :func:`napari_stlnmf.deconvolve` for ``job``; expected failures become a status.

    Returns ``('ok', result)``, ``('cancelled', message)`` or ``('error', message)``;
    unexpected exceptions propagate (napari reports them as bugs).
    """
    from .. import Cancelled, deconvolve

    try:
        result = deconvolve(
            job.slide, job.reference, progress=progress, should_stop=should_stop, **job.kwargs
        )
    except Cancelled as err:
        return "cancelled", str(err) or "cancelled"
    except (StlnmfError, OSError) as err:
        return "error", str(err)
    return "ok", result


class _ProgressRelay(QObject):
    """Carries progress from the worker thread to the GUI thread (queued connection)."""

    progressed = Signal(str, int, int)


def _legend_html(cell_types) -> str:
    import matplotlib
    from matplotlib.colors import to_hex

    cmap = matplotlib.colormaps["viridis"]
    ramp = "".join(
        f'<td bgcolor="{to_hex(cmap(v))}" width="9">&nbsp;</td>'
        for v in [i / 15 for i in range(16)]
    )
    colors = dominant_colors(cell_types)
    swatches = "<br>".join(
        f'<span style="color:{colors[t]}; font-size:14px">&#9632;</span> {t}' for t in cell_types
    )
    return (
        "<b>Cell-type maps</b> (share of cells per spot; 0 = transparent)<br>"
        f'<table cellspacing="0" cellpadding="0"><tr><td>0&nbsp;</td>{ramp}<td>&nbsp;1</td></tr>'
        "</table>"
        f"<b>{DOMINANT_LAYER}</b><br>{swatches}<br>"
        "<b>fit error</b>: relative residual (magma); high where the reference misses a type"
    )


class DeconvolveWidget(Container):
    """Deconvolve (STL NMF): pick spots, image and reference, run, get one map per cell type."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self._viewer = viewer
        self._stop = threading.Event()
        self._relay = _ProgressRelay()
        self._relay.progressed.connect(self._on_progress)
        self.worker = None
        self.running = False  # True from start() until the worker's ``finished`` arrives
        self.last_result = None

        self.slide_file = FileEdit(
            label="open slide",
            mode="r",
            filter="*.h5ad",
            tooltip="Open an .h5ad slide (Space Ranger folders: 'open folder' below)",
        )
        self.slide_folder = FileEdit(
            label="open folder",
            mode="d",
            tooltip="Open a Space Ranger folder: Visium outs/, or Visium HD (the sample, outs/, "
            "binned_outputs/, one square_XXXum/ or segmented_outputs/) at the bin size below",
        )
        self.bin_size = SpinBox(
            label="HD bin size (µm)",
            value=8,
            min=1,
            max=1000,
            tooltip="Visium HD: the square_XXXum/ bins to open (Space Ranger writes 2, 8, 16)",
        )
        self.spots = ComboBox(
            label="spots",
            choices=self._spot_choices,
            nullable=True,
            tooltip="The slide's spots: a Points layer opened by this plugin, or circles/shapes "
            "with a table opened by napari-spatialdata",
        )
        self.image = ComboBox(
            label="tissue image",
            choices=self._image_choices,
            nullable=True,
            tooltip="Image layer in the spots' coordinates (for the graph)",
        )
        self.reference = FileEdit(
            label="reference",
            mode="r",
            filter=_REFERENCE_FILTER,
            tooltip="Single-cell .h5ad (cells x genes) or a signature table (genes x cell types)",
        )
        self._columns: list[str] = []
        self.cell_type_key = ComboBox(
            label="cell-type column",
            choices=self._column_choices,
            tooltip="obs column of the reference with the cell types",
        )
        self.n_neighbors = SpinBox(label="neighbours", value=6, min=1, max=30)
        self.use_image = CheckBox(text="use the image for the graph", value=True)
        self.train = CheckBox(
            text="fine-tune on this slide (~1 min)",
            value=False,
            tooltip="Learn the parameters again on slides simulated on this layout and reference; "
            "off: the shipped parameters (learned the same way on many references)",
        )
        self.train_epochs = SpinBox(label="epochs", value=60, min=1, max=1000, enabled=False)
        self.n_layers = SpinBox(label="layers (0 = default)", value=0, min=0, max=500)
        self.seed = SpinBox(label="seed", value=0, min=0, max=2**31 - 1)
        self.run_button = PushButton(text="Deconvolve")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        buttons = Container(
            layout="horizontal", widgets=[self.run_button, self.cancel_button], labels=False
        )
        self.progress = ProgressBar(label="progress", value=0, min=0, max=1, visible=True)
        self.status = Label(label="", value="Open a sample or a slide, then Deconvolve.")
        self.legend = Label(label="", value="")
        for label in (self.legend, self.status):
            label.native.setWordWrap(True)
            label.native.setMinimumWidth(200)
        for combo in (self.spots, self.image, self.cell_type_key):
            # long layer names must not widen the dock (and squeeze the canvas)
            combo.native.setSizeAdjustPolicy(
                QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon
            )
            combo.native.setMinimumContentsLength(14)
        self.extend(
            [
                self.slide_file,
                self.slide_folder,
                self.bin_size,
                self.spots,
                self.image,
                self.reference,
                self.cell_type_key,
                self.n_neighbors,
                self.use_image,
                self.train,
                self.train_epochs,
                self.n_layers,
                self.seed,
                buttons,
                self.progress,
                self.status,
                self.legend,
            ]
        )

        self.slide_file.changed.connect(self._on_slide_file)
        self.slide_folder.changed.connect(self._on_slide_folder)
        self.reference.changed.connect(lambda _=None: self._on_reference())
        self.spots.changed.connect(lambda _=None: self._on_spots())
        self.train.changed.connect(lambda v: setattr(self.train_epochs, "enabled", bool(v)))
        self.run_button.changed.connect(lambda _=None: self.start())
        self.cancel_button.changed.connect(lambda _=None: self.cancel())
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed):
            event.connect(self._refresh)
        self._refresh()

    # ------------------------------------------------------------------ choices
    def _spot_choices(self, _widget=None):
        """This plugin's spots, and napari-spatialdata's circles/polygons/points with a table."""
        return [
            (layer.name, layer)
            for layer in self._viewer.layers
            if (
                isinstance(layer, napari.layers.Points)
                and "adata" in layer.metadata
                and SLIDE_TAG in layer.metadata
            )
            or (
                isinstance(layer, (napari.layers.Points, napari.layers.Shapes))
                and is_spatialdata_layer(layer.metadata)
            )
        ]

    def _image_choices(self, _widget=None):
        return [
            (layer.name, layer)
            for layer in self._viewer.layers
            if isinstance(layer, napari.layers.Image)
        ]

    def _column_choices(self, _widget=None):
        return list(self._columns)

    def _refresh(self, _event=None):
        before = self.spots.value
        self.reset_choices()
        choices = self._spot_choices()
        if self.spots.value is None and choices:
            self.spots.value = choices[-1][1]  # the newest slide
        if self.spots.value is not before:
            self._on_spots()

    def _on_spots(self):
        """Pre-select the spots' own image and (for samples) the bundled reference."""
        layer = self.spots.value
        if layer is None:
            return
        sid = layer.metadata.get(SLIDE_TAG, {}).get("slide_id")
        sdata = layer.metadata.get("sdata")
        for _name, img in self._image_choices():
            own = sid is not None and img.metadata.get(SLIDE_TAG, {}).get("slide_id") == sid
            if own or (sdata is not None and img.metadata.get("sdata") is sdata):
                self.image.value = img
                break
        ref = layer.metadata.get("reference")
        if ref and not self._reference_path():
            self.reference.value = ref
            key = layer.metadata.get("cell_type_key")
            if key in self.cell_type_key.choices:
                self.cell_type_key.value = key

    def _reference_path(self) -> Path | None:
        value = self.reference.value
        if value is None or str(value) in ("", "."):
            return None
        return Path(value)

    def _on_reference(self):
        from .. import io

        path = self._reference_path()
        self._columns = []
        if path is not None:
            try:
                self._columns = io.reference_columns(path)
            except (StlnmfError, OSError) as err:
                show_error(str(err))
        self.cell_type_key.reset_choices()
        self.cell_type_key.enabled = bool(self._columns)

    def _on_slide_file(self, value=None):
        path = self.slide_file.value
        if path is None or str(path) in ("", "."):
            return
        try:
            layers = self._viewer.open(str(path), plugin="napari-stlnmf")
        except Exception as err:  # noqa: BLE001 -- any reader error: tell the user
            show_error(f"Could not open {path}: {err}")
            return
        for layer in layers:
            if isinstance(layer, napari.layers.Points) and SLIDE_TAG in layer.metadata:
                self.spots.value = layer

    def _on_slide_folder(self, value=None):
        """Open a Space Ranger folder; Visium HD bins at the chosen bin size (napari's own
        File > Open Folder cannot ask for one, so the widget reads the layers itself)."""
        from ..io import visium_hd
        from .reader import read_slide_layers

        path = self.slide_folder.value
        if path is None or str(path) in ("", "."):
            return
        path = Path(path)
        bin_size = self.bin_size.value if visium_hd.has_bins(path) else None
        try:
            layers = read_slide_layers(path, bin_size=bin_size)
        except Exception as err:  # noqa: BLE001 -- any reader error: tell the user
            show_error(f"Could not open {path}: {err}")
            return
        for data, kwargs, kind in layers:
            layer = self._viewer.add_layer(napari.layers.Layer.create(data, kwargs, kind))
            if isinstance(layer, napari.layers.Points) and SLIDE_TAG in layer.metadata:
                self.spots.value = layer

    # ------------------------------------------------------------------ running
    def _job(self) -> Job:
        spots = self.spots.value
        if spots is None:
            raise StlnmfError(
                "No spots layer: open a slide (File > Open, a sample, or 'open "
                "slide' above) so its spots appear as a Points layer."
            )
        reference = self._reference_path()
        if reference is None:
            raise StlnmfError(
                "Choose a reference: a single-cell .h5ad with a cell-type column "
                "or a signature table (genes x cell types)."
            )
        image = self.image.value if self.use_image.value else None
        slide = self._slide(spots, image)
        key = self.cell_type_key.value if self._columns else None
        kwargs = {
            "cell_type_key": key,
            "train": bool(self.train.value),
            "train_epochs": int(self.train_epochs.value),
            "n_layers": int(self.n_layers.value) or None,
            "use_image": image is not None,
            "n_neighbors": int(self.n_neighbors.value),
            "seed": int(self.seed.value),
        }
        return Job(
            slide=slide,
            reference=str(reference),
            kwargs=kwargs,
            source=spots.metadata.get(SLIDE_TAG, {}).get("slide_id") or f"layer-{id(spots)}",
            spots_name=spots.name,
            spatialdata_layer=None if SLIDE_TAG in spots.metadata else spots,
        )

    @staticmethod
    def _slide(spots, image):
        """The slide of the chosen layers: counts from the spots layer, spots and image joined
        through their data-to-world transforms (napari-spatialdata's affines included)."""
        if SLIDE_TAG not in spots.metadata:  # napari-spatialdata's layer
            adata = spots_from_spatialdata_layer(
                spots.data, spots.metadata, sizes=getattr(spots, "size", None)
            )
            spots_to_world = layer_to_world(spots)
        else:
            adata = spots.metadata["adata"]
            own = spots.metadata[SLIDE_TAG].get("slide_id")
            if image is None or image.metadata.get(SLIDE_TAG, {}).get("slide_id") == own:
                return adata  # no image, or the slide's own one (already in uns['spatial'])
            spots_to_world = layer_to_world(spots)
            linear, shift = layer_to_world(image)[:2, :2], layer_to_world(image)[:2, 2]
            if (
                np.allclose(spots_to_world, np.eye(3))
                and np.allclose(linear, np.diag(np.diag(linear)))
                and np.allclose(shift, 0.0)
            ):  # an image only scaled onto the spots' pixels: its scale factor is enough
                data = image.data[0] if image.multiscale else image.data
                return slide_for_deconvolution(
                    adata, data, scale=image.scale, translate=image.translate
                )
        if image is None:
            return slide_on_image(adata, spots_to_world)
        data, image_to_world = image_for_features(
            image.data,
            layer_to_world(image),
            multiscale=image.multiscale,
            downsample_factors=getattr(image, "downsample_factors", None),
        )
        return slide_on_image(adata, spots_to_world, data, image_to_world)

    def start(self):
        """Start a run in a worker thread (returns at once; see :attr:`worker`)."""
        if self.running:
            return
        try:
            job = self._job()
        except (StlnmfError, OSError) as err:
            show_error(str(err))
            return
        self._stop.clear()
        self._job_running = job
        worker = create_worker(
            run_deconvolution,
            job,
            progress=self._relay.progressed.emit,
            should_stop=self._stop.is_set,
            _start_thread=False,
        )
        worker.returned.connect(self._on_returned)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.running = True
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.progress.max, self.progress.value = 1, 0
        self.status.value = "Starting…"
        worker.start()

    def cancel(self):
        """Ask the running worker to stop at its next checkpoint."""
        if self.running:
            self._stop.set()
            self.status.value = "Cancelling…"

    def _on_progress(self, stage: str, i: int, n: int):
        self.progress.max = max(int(n), 1)
        self.progress.value = min(max(int(i), 0), self.progress.max)
        text = stage_label(stage)
        self.status.value = f"{text} ({i}/{n})" if n > 1 else text

    def _on_finished(self):
        self.running = False
        self.run_button.enabled = True
        self.cancel_button.enabled = False

    def _on_returned(self, outcome):
        status, payload = outcome
        job = self._job_running
        if status == "cancelled":
            self.status.value = "Cancelled."
            self.progress.value = 0
            show_info("Deconvolution cancelled.")
            return
        if status == "error":
            self.status.value = "Failed: see the message."
            self.progress.value = 0
            show_error(payload)
            return
        self.last_result = payload
        self._show_result(payload, job)

    def _show_result(self, result, job: Job):
        for layer in list(self._viewer.layers):
            tag = layer.metadata.get(RESULT_TAG)
            if tag is not None and tag.get("source") == job.source:
                self._viewer.layers.remove(layer)
        slide = result.adata if result.adata is not None else job.slide
        layers = result_layers(
            result.proportions,
            result.fit_error,
            result.qc,
            slide,
            source=job.source,
            annotated=result.adata,
        )
        for data, kwargs, kind in layers:
            getattr(self._viewer, f"add_{kind}")(data, **kwargs)
        if job.spots_name in self._viewer.layers:
            self._viewer.layers[job.spots_name].visible = False
        types = [str(t) for t in result.proportions.columns]
        n_missing = int(result.proportions.isna().any(axis=1).sum())
        secs = result.info.get("seconds", float("nan"))
        msg = f"Done in {secs:.1f} s: {len(types)} cell types, {len(result.proportions)} spots."
        if n_missing:
            msg += f" {n_missing} spots without estimate (NaN, see qc)."
            show_warning(f"{n_missing} spots have no estimate (no counts on the selected genes).")
        if job.spatialdata_layer is not None:
            try:
                table = write_results_to_spatialdata_layer(job.spatialdata_layer.metadata, result)
            except (StlnmfError, ImportError, ValueError) as err:
                show_warning(f"The results could not be added to the SpatialData table: {err}")
            else:
                msg += f" Added to table {table!r} as obs['stlnmf_<type>'] (in memory)."
        self.status.value = msg
        self.legend.value = _legend_html(types)
        self.progress.value = self.progress.max
