"""Dock widget: deconvolve the spots of a slide in napari and show cell-type maps.

UI only. The compute is :func:`napari_stlnmf.deconvolve`, run in a napari ``thread_worker``;
its ``progress(stage, i, n)`` callback is relayed to the GUI thread by a Qt signal (queued
across threads) and Cancel sets a flag read by ``should_stop``. Results become at most three
layers sharing one table (:func:`napari_stlnmf.layers.result_layers`, built in the worker too):
one proportion map recoloured by the dock's cell-type picker, the dominant type and the fit
error; Visium HD bins as images. Hovering a result layer shows the spot's or bin's largest
types in a text overlay on the canvas (:func:`napari_stlnmf.layers.hover_text`). Closing the
dock or the viewer cancels the run the same way, and the widget then ignores the worker's
late signals (its Qt objects may be gone).
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
from qtpy.QtCore import QEvent, QObject, Qt, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFrame,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from ..diagnostics import diagnosis_summary
from ..errors import StlnmfError
from ..layers import (
    BINS_KEY,
    INDEX_KEY,
    INTERVALS_KEY,
    PROPORTION_ROLE,
    RESULT_TAG,
    SLIDE_TAG,
    TABLE_KEY,
    fine_tuning_note,
    hover_text,
    image_for_features,
    is_spatialdata_layer,
    layer_to_world,
    proportion_values,
    result_layer_name,
    result_layers,
    sample_columns,
    slide_for_deconvolution,
    slide_on_image,
    spots_from_spatialdata_layer,
    write_results_to_spatialdata_layer,
)
from ..progress import stage_label
from .legend import legend_html
from .writer import NoResultsToExport, write_proportions

__all__ = ["DeconvolveWidget", "build_result_layers", "run_deconvolution", "show_cell_type"]

_REFERENCE_FILTER = "*.h5ad *.csv *.tsv *.txt *.csv.gz *.tsv.gz *.txt.gz"


@dataclass
class Job:
    """Everything one run needs (built in the GUI thread, used in the worker)."""

    slide: object
    reference: str
    kwargs: dict = field(default_factory=dict)
    source: str = ""
    spots_name: str = ""
    slide_name: str = ""  # prefix of the result layers' names
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


def build_result_layers(job: Job, result) -> list[tuple]:
    """The result's layer-data tuples (pure: run in the worker thread, added in the GUI's)."""
    slide = result.adata if result.adata is not None else job.slide
    return result_layers(
        result.proportions,
        result.fit_error,
        result.qc,
        slide,
        source=job.source,
        annotated=result.adata,
        slide_name=job.slide_name,
        diagnostics=getattr(result, "diagnostics", None),
        uncertainty=getattr(result, "uncertainty", None),
    )


def _run_and_build(job: Job, progress=None, should_stop=None):
    """:func:`run_deconvolution`, then the layers, both off the GUI thread."""
    status, payload = run_deconvolution(job, progress=progress, should_stop=should_stop)
    if status != "ok":
        return status, payload
    if progress is not None:
        progress("building the result layers", 0, 1)
    return status, (payload, build_result_layers(job, payload))


def show_cell_type(layer, cell_type: str) -> None:
    """Recolour a proportion map (role ``'cell_type'``) to ``cell_type``, in place: a Points
    layer by its feature column, a raster by writing the type's values into its pixels; the
    layer is renamed ``"<slide> · <type>"``. No layer is added or removed."""
    from ..result_rasters import raster

    meta = layer.metadata
    tag = meta[RESULT_TAG]
    cell_type = str(cell_type)
    if cell_type not in meta["cell_types"]:
        raise StlnmfError(f"{cell_type!r} is none of this result's cell types.")
    if BINS_KEY in meta:
        raster(
            meta[BINS_KEY], proportion_values(meta[TABLE_KEY], cell_type), fill=0.0, out=layer.data
        )
        layer.refresh()
    else:
        layer.face_color = cell_type
    tag["cell_type"] = cell_type
    layer.name = result_layer_name(tag.get("slide_name"), cell_type)


def result_row(layer, world_position) -> int | None:
    """The table row of the spot or bin under ``world_position`` in a result layer, or None."""
    meta = layer.metadata
    if INDEX_KEY in meta:
        index = meta[INDEX_KEY]
        rc = np.rint(np.asarray(layer.world_to_data(world_position), dtype=float)[-2:])
        r, c = int(rc[0]), int(rc[1])
        if 0 <= r < index.shape[0] and 0 <= c < index.shape[1] and index[r, c] >= 0:
            return int(index[r, c])
        return None
    value = layer.get_value(world_position, world=True)
    return None if value is None else int(value)


def text_overlay(viewer):
    """The canvas' text overlay (``viewer.canvas.overlays.text`` since napari 0.9)."""
    canvas = getattr(viewer, "canvas", None)
    overlay = getattr(getattr(canvas, "overlays", None), "text", None)
    return overlay if overlay is not None else viewer.text_overlay


class _ProgressRelay(QObject):
    """Carries progress from the worker thread to the GUI thread (queued connection)."""

    progressed = Signal(str, int, int)


class _CloseWatcher(QObject):
    """Emits ``closed`` when the dock is closed (napari takes the widget out of it: its parent
    becomes None) or a window holding it (the dock, the viewer) gets a close event."""

    closed = Signal()

    def __init__(self, widget: QWidget):
        super().__init__()
        self._widget = widget
        self._watched: list[QObject] = []
        widget.installEventFilter(self)

    def eventFilter(self, obj, event):
        kind = event.type()
        if obj is self._widget:
            if kind == QEvent.Type.ParentChange and obj.parent() is None and self._watched:
                self.closed.emit()
            elif kind in (QEvent.Type.ParentChange, QEvent.Type.Show):
                self._watch(obj.window())
        elif kind == QEvent.Type.Close:
            self.closed.emit()
        return False

    def _watch(self, window):
        if window is not self._widget and not any(window is w for w in self._watched):
            window.installEventFilter(self)
            self._watched.append(window)


class DeconvolveWidget(Container):
    """Deconvolve cell types: pick spots, image and reference, run, get one map per cell type."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self._viewer = viewer
        self._stop = threading.Event()
        self._relay = _ProgressRelay()
        self._relay.progressed.connect(self._on_progress)
        self.worker = None
        self.running = False  # True from start() until the worker's ``finished`` arrives
        self.closed = False  # the dock or the viewer was closed: late signals are ignored
        self.last_result = None
        self._last_source = None  # the slide id of the last run's result layers

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
        self.library_key = ComboBox(
            label="sample column",
            choices=self._sample_column_choices,
            tooltip="Several tissue sections in one slide: the obs column naming each spot's "
            "section. Each section is fitted on its own (results for every spot); 'none': "
            "one fit for all spots",
        )
        self.n_neighbors = SpinBox(
            label="neighbours per spot",
            value=6,
            min=1,
            max=30,
            tooltip="How many nearest spots each spot is smoothed with (the spatial graph): "
            "more gives smoother maps, fewer keeps sharper boundaries",
        )
        self.use_image = CheckBox(
            text="follow the tissue image",
            value=True,
            tooltip="Smooth less between neighbouring spots whose tissue looks different in the "
            "image, so maps follow tissue boundaries; off: by distance only",
        )
        self.diagnose = CheckBox(
            text="flag spots the reference cannot explain",
            value=True,
            tooltip="Adds a 'reference misfit' layer: how unusual each spot's residual is for "
            "this slide (z; 3 and above: poorly explained), and names the genes of poorly "
            "explained regions, a hint of a cell type missing from the reference (~15 % "
            "more time)",
        )
        self.uncertainty = CheckBox(
            text="intervals (90 %) on hover",
            value=False,
            tooltip="Per spot and type a 90 % interval for each proportion (counts redrawn from "
            "the fitted model, the fit re-run 30 times; calibrated on simulations, narrower "
            "than the truth on real tissue): about 5x the time",
        )
        self.train = CheckBox(
            text="fine-tune on this slide (~1 min)",
            value=False,
            tooltip="Learn the parameters again on slides simulated on this layout and reference; "
            "off: the shipped parameters (learned the same way on many references)",
        )
        self.train_epochs = SpinBox(
            label="fine-tuning epochs",
            value=60,
            min=1,
            max=1000,
            enabled=False,
            tooltip="At most this many passes over the simulated slides; fine-tuning stops "
            "earlier when the validation error no longer improves",
        )
        self.n_layers = SpinBox(
            label="solver steps (0: as learned)",
            value=0,
            min=0,
            max=500,
            tooltip="Update steps of the solver (layers of the learned network); 0: as many "
            "as the parameters were learned with",
        )
        self.seed = SpinBox(
            label="random seed",
            value=0,
            min=0,
            max=2**31 - 1,
            tooltip="Seed of the simulated training slides and of any random step: the same "
            "seed on the same inputs gives the same result",
        )
        self.run_button = PushButton(text="Deconvolve")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.cell_type_shown = ComboBox(
            label="cell type shown",
            choices=self._shown_type_choices,
            tooltip="The cell type the proportion map shows (one map, recoloured: the type's "
            "share of cells per spot); the dominant type and the fit error are layers too",
        )
        self.export_button = PushButton(
            text="Export results…",
            enabled=False,
            tooltip="Save the proportions of the selected result layer's slide (else the last "
            "run's): a CSV table by barcode, or an .h5ad this plugin opens again with the maps",
        )
        buttons = Container(
            layout="horizontal", widgets=[self.run_button, self.cancel_button], labels=False
        )
        self.progress = ProgressBar(label="progress", value=0, min=0, max=1, visible=True)
        self.status = Label(label="", value="Open a sample or a slide, then Deconvolve.")
        self.legend = Label(label="", value="")
        self.diagnosis = Label(label="", value="")
        self.diagnosis.native.setTextFormat(Qt.TextFormat.PlainText)
        self.diagnosis.native.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        for label in (self.legend, self.status, self.diagnosis):
            label.native.setWordWrap(True)
            label.native.setMinimumWidth(200)
        # messages are shown whole, as plain text (a "<type>" must not vanish as a tag),
        # and can be selected to copy them
        self.status.native.setTextFormat(Qt.TextFormat.PlainText)
        self.status.native.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        for combo in (
            self.spots,
            self.image,
            self.cell_type_key,
            self.library_key,
            self.cell_type_shown,
        ):
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
                self.library_key,
                self.n_neighbors,
                self.use_image,
                self.diagnose,
                self.uncertainty,
                self.train,
                self.train_epochs,
                self.n_layers,
                self.seed,
                buttons,
                self.cell_type_shown,
                self.export_button,
                self.progress,
                self.status,
            ]
        )
        # the diagnosis and the legend grow with the result (20+ types, several regions): in a
        # scroll area of their own, so the dock never stretches the window past the screen
        results = QScrollArea()
        results.setWidgetResizable(True)
        results.setFrameShape(QFrame.Shape.NoFrame)
        inner = QWidget()
        column = QVBoxLayout(inner)
        column.setContentsMargins(0, 0, 0, 0)
        for label in (self.diagnosis, self.legend):
            column.addWidget(label.native)
        column.addStretch(1)
        results.setWidget(inner)
        results.setMinimumHeight(160)
        self.native.layout().addWidget(results)
        self._results_area = results

        self.slide_file.changed.connect(self._on_slide_file)
        self.slide_folder.changed.connect(self._on_slide_folder)
        self.reference.changed.connect(lambda _=None: self._on_reference())
        self.spots.changed.connect(lambda _=None: self._on_spots())
        self.train.changed.connect(lambda v: setattr(self.train_epochs, "enabled", bool(v)))
        self.run_button.changed.connect(lambda _=None: self.start())
        self.cancel_button.changed.connect(lambda _=None: self.cancel())
        self.export_button.changed.connect(lambda _=None: self._export_dialog())
        self.cell_type_shown.changed.connect(self._on_shown_type)
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed):
            event.connect(self._refresh)
        viewer.layers.selection.events.active.connect(self._on_active)
        viewer.mouse_move_callbacks.append(self._on_mouse_move)
        self._close_watcher = _CloseWatcher(self.native)
        self._close_watcher.closed.connect(self._on_closed)
        # backstop: the native widget deleted with the viewer's window (no Qt object is
        # touched by this callback: they are being deleted)
        self.native.destroyed.connect(lambda _=None: self._on_closed())
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

    def _proportion_layer(self):
        """The proportion map the picker drives: the selected result layer's run's, else the
        last run's."""
        active = self._viewer.layers.selection.active
        source = self._last_source
        if active is not None and RESULT_TAG in active.metadata:
            source = active.metadata[RESULT_TAG].get("source")
        for layer in self._result_layers(source):
            if layer.metadata[RESULT_TAG].get("role") == PROPORTION_ROLE:
                return layer
        return None

    def _shown_type_choices(self, _widget=None):
        layer = self._proportion_layer() if hasattr(self, "_last_source") else None
        return [] if layer is None else list(layer.metadata["cell_types"])

    def _sync_shown_type(self):
        """Picker choices and value from the current proportion map (no recolouring)."""
        layer = self._proportion_layer()
        self._syncing = True
        try:
            self.cell_type_shown.reset_choices()
            self.cell_type_shown.enabled = layer is not None
            if layer is not None:
                self.cell_type_shown.value = layer.metadata[RESULT_TAG]["cell_type"]
        finally:
            self._syncing = False

    def _on_shown_type(self, value=None):
        if self.closed or getattr(self, "_syncing", False) or not value:
            return
        layer = self._proportion_layer()
        if layer is not None and layer.metadata[RESULT_TAG].get("cell_type") != value:
            show_cell_type(layer, value)

    def _on_active(self, _event=None):
        if not self.closed:
            self._sync_shown_type()

    def hover_at(self, world_position) -> str:
        """The hover text of the topmost visible result layer's spot or bin at
        ``world_position`` ('' off the results)."""
        for layer in reversed(list(self._viewer.layers)):
            if not layer.visible or RESULT_TAG not in layer.metadata:
                continue
            row = result_row(layer, world_position)
            if row is not None:
                meta = layer.metadata
                return hover_text(
                    meta[TABLE_KEY], row, meta["cell_types"], intervals=meta.get(INTERVALS_KEY)
                )
        return ""

    def _on_mouse_move(self, viewer, event):
        if self.closed:
            return
        text = self.hover_at(event.position)
        overlay = text_overlay(viewer)
        if text:
            overlay.text = text
            overlay.visible = True
        elif overlay.visible and overlay.text:
            overlay.text = ""
            overlay.visible = False

    def _column_choices(self, _widget=None):
        return list(self._columns)

    def _sample_column_choices(self, _widget=None):
        """'none', then the spots' obs columns that can name sections (library_key)."""
        layer = self.spots.value if hasattr(self, "spots") else None
        adata = None if layer is None else layer.metadata.get("adata")
        columns = [] if adata is None or not hasattr(adata, "obs") else sample_columns(adata)
        return [("none", "")] + [(c, c) for c in columns]

    def _refresh(self, _event=None):
        if self.closed:
            return
        before = self.spots.value
        self.reset_choices()
        choices = self._spot_choices()
        if self.spots.value is None and choices:
            self.spots.value = choices[-1][1]  # the newest slide
        if self.spots.value is not before:
            self._on_spots()
        self.export_button.enabled = bool(self._result_layers())
        self._sync_shown_type()

    def _result_layers(self, source=None) -> list:
        return [
            layer
            for layer in self._viewer.layers
            if RESULT_TAG in layer.metadata
            and (source is None or layer.metadata[RESULT_TAG].get("source") == source)
        ]

    def _on_spots(self):
        """Pre-select the spots' own image and (for samples) the bundled reference."""
        self.library_key.reset_choices()
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
        # an empty FileEdit reads as the working directory: no reference chosen
        if value is None or str(value) in ("", ".") or Path(value).is_dir():
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
            "library_key": self.library_key.value or None,
            "train": bool(self.train.value),
            "train_epochs": int(self.train_epochs.value),
            "n_layers": int(self.n_layers.value) or None,
            "use_image": image is not None,
            "n_neighbors": int(self.n_neighbors.value),
            "seed": int(self.seed.value),
            "diagnose": bool(self.diagnose.value),
            "uncertainty": bool(self.uncertainty.value),
        }
        return Job(
            slide=slide,
            reference=str(reference),
            kwargs=kwargs,
            source=spots.metadata.get(SLIDE_TAG, {}).get("slide_id") or f"layer-{id(spots)}",
            spots_name=spots.name,
            slide_name=spots.name.removesuffix(" spots"),
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
        if self.running or self.closed:
            return
        # a new attempt: nothing of the previous run's status may stay on screen
        self.progress.max, self.progress.value = 1, 0
        self.status.value = "Checking the inputs…"
        try:
            job = self._job()
        except (StlnmfError, OSError) as err:
            self.status.value = f"Not started: {err}"
            show_error(str(err))
            return
        self._stop.clear()
        self._job_running = job
        worker = create_worker(
            _run_and_build,
            job,
            progress=self._relay.progressed.emit,
            should_stop=self._stop.is_set,
            _start_thread=False,
        )
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_errored)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.running = True
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.status.value = "Starting…"
        worker.start()

    def cancel(self):
        """Ask the running worker to stop at its next checkpoint."""
        if self.running:
            self._stop.set()
            self.status.value = "Cancelling…"

    def _on_closed(self):
        """The dock or the viewer closed: stop the worker, let go of the viewer's events."""
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        for event in (self._viewer.layers.events.inserted, self._viewer.layers.events.removed):
            event.disconnect(self._refresh)
        self._viewer.layers.selection.events.active.disconnect(self._on_active)
        if self._on_mouse_move in self._viewer.mouse_move_callbacks:
            self._viewer.mouse_move_callbacks.remove(self._on_mouse_move)

    def _on_progress(self, stage: str, i: int, n: int):
        if self.closed:
            return
        self.progress.max = max(int(n), 1)
        self.progress.value = min(max(int(i), 0), self.progress.max)
        text = stage_label(stage)
        self.status.value = f"{text} ({i}/{n})" if n > 1 else text

    def _on_finished(self):
        self.running = False
        if self.closed:
            return
        self.run_button.enabled = True
        self.cancel_button.enabled = False

    def _on_errored(self, err):
        """An unexpected exception (napari reports it too, with its traceback)."""
        if self.closed:
            return
        self.status.value = f"Failed with an unexpected error: {type(err).__name__}: {err}"
        self.progress.value = 0

    def _on_returned(self, outcome):
        if self.closed:
            return
        status, payload = outcome
        job = self._job_running
        if status == "cancelled":
            self.status.value = "Cancelled."
            self.progress.value = 0
            show_info("Deconvolution cancelled.")
            return
        if status == "error":
            self.status.value = f"Failed: {payload}"
            self.progress.value = 0
            show_error(payload)
            return
        result, layers = payload
        self.last_result = result
        self._show_result(result, job, layers)

    def _show_result(self, result, job: Job, layers=None):
        for layer in self._result_layers(job.source):
            self._viewer.layers.remove(layer)
        if layers is None:
            layers = build_result_layers(job, result)
        added = [getattr(self._viewer, f"add_{kind}")(data, **kw) for data, kw, kind in layers]
        for layer in added:  # napari's colour bar on the canvas for the shown image
            colorbar = getattr(layer, "colorbar", None)
            if colorbar is not None:
                colorbar.visible = bool(layer.visible)
        self._last_source = job.source
        self._sync_shown_type()
        fit_error_max = layers[0][1]["metadata"][RESULT_TAG]["fit_error_max"]
        if job.spots_name in self._viewer.layers:
            self._viewer.layers[job.spots_name].visible = False
        types = [str(t) for t in result.proportions.columns]
        n_missing = int(result.proportions.isna().any(axis=1).sum())
        secs = result.info.get("seconds", float("nan"))
        msg = f"Done in {secs:.1f} s: {len(types)} cell types, {len(result.proportions)} spots."
        if job.kwargs.get("train"):
            note = fine_tuning_note(result.info.get("train"), job.kwargs.get("train_epochs"))
            msg += f" {note}" if note else ""
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
        diagnostics = getattr(result, "diagnostics", None)
        self.diagnosis.value = (
            ""
            if diagnostics is None
            else diagnosis_summary(diagnostics, result.unexplained_regions)
        )
        self.legend.value = legend_html(types, fit_error_max, misfit=diagnostics is not None)
        self.progress.value = self.progress.max

    # ------------------------------------------------------------------ export
    def _export_layer(self):
        """The selected result layer, else one of the last run's."""
        active = self._viewer.layers.selection.active
        if active is not None and RESULT_TAG in active.metadata:
            return active
        layers = self._result_layers(self._last_source) or self._result_layers()
        return layers[0] if layers else None

    def _export_dialog(self):
        layer = self._export_layer()
        start = "" if layer is None else layer.name.split(" · ")[0]
        path, _ = QFileDialog.getSaveFileName(
            self.native,
            "Export STL NMF results",
            f"{start or 'proportions'}.csv",
            "CSV table by barcode (*.csv);;AnnData with the maps (*.h5ad)",
        )
        if path:
            self.export_results(path)

    def export_results(self, path) -> list[str]:
        """Write the proportions (:func:`~napari_stlnmf._napari.writer.write_proportions`):
        ``.h5ad`` or CSV by barcode; the message says where, or why not."""
        layer = self._export_layer()
        try:
            if layer is None:
                raise NoResultsToExport("No results to export yet: run Deconvolve first.")
            meta = {"name": layer.name, "features": layer.features, "metadata": layer.metadata}
            written = write_proportions(str(path), layer.data, meta)
        except (NoResultsToExport, StlnmfError, OSError) as err:
            self.status.value = f"Export failed: {err}"
            show_error(str(err))
            return []
        self.status.value = f"Exported the proportions to {written[0]}"
        show_info(f"Exported to {written[0]}")
        return written
