"""Slides and deconvolution results as napari layer-data tuples (pure: no Qt, no napari import).

World coordinates are the slide's full-resolution pixels, in napari's (row, col) = (y, x)
order: spots sit at ``obsm['spatial'][:, ::-1]`` and the tissue image gets
``scale = 1 / scalefactor`` so image pixel ``spatial * scalefactor`` lands on the spot.
Spots are drawn as discs :func:`napari_stlnmf.io.spot_diameter` wide (``spot_diameter_fullres``,
else estimated from the spacing), the same size as in the PNG maps of
:mod:`napari_stlnmf.plotting`; Visium HD bins as squares of their true side,
:func:`napari_stlnmf.io.square_bin_size` (``bin_size_um / microns_per_pixel``).

A slide read from a SpatialData store carries ``metadata['world_affine']`` in its library (the
(x, y) affine from ``obsm['spatial']`` to the store's coordinate system): the layers then get it
as their napari ``affine`` and lie over napari-spatialdata's layers of the same store. Layers
opened by napari-spatialdata (``metadata['sdata']``, ``['adata']``, ``['region_key']``,
``['instance_key']``) become a slide with :func:`spots_from_spatialdata_layer` and
:func:`slide_on_image`, through each layer's data-to-world transform (:func:`layer_to_world`).
The frame helpers live in :mod:`napari_stlnmf.layer_frames`, napari-spatialdata's layers in
:mod:`napari_stlnmf.spatialdata_layers`; both are re-exported here.

Layers made here are tagged in ``metadata``:

- ``metadata['stlnmf_slide']``: ``{'slide_id', 'role': 'image'|'spots', 'library_id'}``;
  the spots layer also carries the AnnData (``metadata['adata']``, counts for the widget),
  ``metadata['path']`` and, for samples, ``metadata['reference']``/``['cell_type_key']``.
- ``metadata['stlnmf_result']``: ``{'source': slide_id, 'role': 'cell_type'|'dominant'|
  'fit_error', 'cell_type': name|None}``; ``metadata['adata']`` is the annotated copy with
  ``obsm['stlnmf_proportions']`` (what the writer exports). Re-running replaces layers by
  this tag (not by name: result layers are named ``"<slide> · <type>"``, so two slides'
  maps never collide).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import io
from ._constants import (
    FIT_ERROR_KEY,
    LOWER_KEY,
    PROPORTIONS_KEY,
    QC_KEY,
    SPATIAL_KEY,
    UPPER_KEY,
)
from .errors import ImageMismatchError

# re-exported: the frames and napari-spatialdata's layers live in their own modules
from .layer_frames import (
    LAYER_DIAMETER_KEY,
    SWAP_XY,
    display_library,
    image_for_features,
    layer_to_world,
    slide_on_image,
    spot_diameter,
    spot_symbol,
    spots_yx,
    world_affine,
)
from .spatialdata_layers import (
    SPATIALDATA_LAYER_KEYS,
    is_spatialdata_layer,
    spots_from_spatialdata_layer,
    write_results_to_spatialdata_layer,
)

__all__ = [
    "BINS_KEY",
    "DOMINANT_LAYER",
    "FIT_ERROR_LAYER",
    "INDEX_KEY",
    "INTERVALS_KEY",
    "LAYER_DIAMETER_KEY",
    "MISFIT_LAYER",
    "MISFIT_MAX",
    "OPAQUE_FROM",
    "POSITIONS_KEY",
    "PROPORTION_ROLE",
    "RESULT_TAG",
    "SLIDE_TAG",
    "SPATIALDATA_LAYER_KEYS",
    "SWAP_XY",
    "TABLE_KEY",
    "ResultIntervals",
    "display_library",
    "dominant_codes",
    "dominant_colors",
    "dominant_label_colors",
    "fine_tuning_note",
    "fit_error_limit",
    "hover_text",
    "image_for_features",
    "is_spatialdata_layer",
    "layer_to_world",
    "misfit_colormap",
    "proportion_values",
    "ramp_alpha",
    "ramp_colormap",
    "result_grid",
    "result_layer_name",
    "result_layers",
    "result_layers_from_adata",
    "results_table",
    "sample_columns",
    "slide_for_deconvolution",
    "slide_layers",
    "slide_on_image",
    "spot_diameter",
    "spot_symbol",
    "spots_from_spatialdata_layer",
    "spots_yx",
    "top_types",
    "world_affine",
    "write_results_to_spatialdata_layer",
    "zero_transparent_colormap",
]

SLIDE_TAG = "stlnmf_slide"
RESULT_TAG = "stlnmf_result"
DOMINANT_LAYER = "dominant cell type"
FIT_ERROR_LAYER = "fit error"
NO_ESTIMATE = "no estimate"
FIT_ERROR_COLUMN = "fit_error"  # feature/CSV column names (short: shown on hover)
QC_COLUMN = "qc"
# with deconvolve(diagnose=True): how unusual each spot's misfit is for the slide (a z-score)
MISFIT_LAYER = "reference misfit"
MISFIT_COLUMN = "deviance_z"
FLAGGED_COLUMN = "poorly_explained"
MISFIT_MAX = 6.0  # the misfit scale's top (z); the flag is at DEVIANCE_Z_THRESHOLD = 3
# the result layers' first feature column: napari's status bar lists the features in order on
# one line, so the spot's largest types come first (the full table follows, cut off by the bar)
TOP_TYPES_COLUMN = "top"
TOP_TYPES_SHOWN = 3
LAYER_NAME_SEPARATOR = " · "
PROPORTION_COLORMAP = "viridis"
FIT_ERROR_COLORMAP = "magma"
# proportions fade in: transparent at 0, opaque from OPAQUE_FROM, so H&E shows through
OPAQUE_FROM = 0.3
PROPORTION_ROLE = "cell_type"  # the role of the one map the picker recolours
TABLE_KEY = "stlnmf_table"  # metadata: the one results table of a run's layers
POSITIONS_KEY = "stlnmf_positions"  # metadata: the spots' (row, col) positions
BINS_KEY = "stlnmf_bins"  # metadata of raster layers: the BinGrid
INTERVALS_KEY = "stlnmf_intervals"  # metadata: the proportions' intervals (ResultIntervals)
INDEX_KEY = "stlnmf_index"  # metadata of raster layers: each pixel's table row (-1: none)
HOVER_TYPES = 5
HOVER_MIN_SHARE = 0.01


# --------------------------------------------------------------------------- #
# colours
# --------------------------------------------------------------------------- #


def zero_transparent_colormap(name: str = PROPORTION_COLORMAP, n: int = 32) -> dict:
    """A napari colormap (as a dict) equal to ``name`` on (0, 1] but transparent at exactly 0.

    Proportions below the core's ``min_proportion`` are exact zeros, so absent cell types
    leave the image visible. NaN (spots without an estimate) are transparent in napari too.
    """
    import matplotlib

    cmap = matplotlib.colormaps[name]
    controls = np.r_[0.0, np.linspace(1e-3, 1.0, n)]
    colors = np.vstack([[0.0, 0.0, 0.0, 0.0], cmap(np.linspace(0.0, 1.0, n))])
    return {"colors": colors, "controls": controls, "name": f"{name} (0 transparent)"}


def ramp_colormap(name: str = PROPORTION_COLORMAP, n: int = 32, opaque_from=OPAQUE_FROM) -> dict:
    """A napari colormap (as a dict): ``name``'s colours on (0, 1] with an opacity ramp,
    transparent at exactly 0 and fading in up to ``opaque_from``, so low proportions let the
    tissue image show through instead of hiding it in dark colours."""
    import matplotlib

    cmap = matplotlib.colormaps[name]
    # the ramp's knee is a control point: opaque from there on, exactly
    controls = np.unique(np.r_[np.linspace(1e-3, 1.0, n), float(opaque_from)])
    colors = np.vstack([[0.0, 0.0, 0.0, 0.0], cmap(controls)])
    controls = np.r_[0.0, controls]
    colors[1:, 3] = ramp_alpha(controls[1:], opaque_from)
    return {
        "colors": colors,
        "controls": controls,
        "name": f"{name} (fading in to {opaque_from:g})",
    }


def ramp_alpha(values, opaque_from=OPAQUE_FROM) -> np.ndarray:
    """The opacity :func:`ramp_colormap` gives ``values`` (for the legend and tests)."""
    v = np.asarray(values, dtype=np.float64)
    return np.where(v > 0, np.clip(0.15 + 0.85 * v / float(opaque_from), 0.0, 1.0), 0.0)


def misfit_colormap() -> dict:
    """The misfit layer's colormap over z in [0, MISFIT_MAX]: clear up to 1 (the slide's
    usual), yellow fading in to an opaque orange at 3 (flagged: poorly explained), dark red
    from 6 (far off)."""
    controls = np.array([0.0, 1.0, 2.0, 3.0, MISFIT_MAX]) / MISFIT_MAX
    colors = np.array(
        [
            [1.0, 1.0, 0.6, 0.0],
            [1.0, 1.0, 0.6, 0.0],
            [1.0, 0.85, 0.2, 0.55],
            [1.0, 0.5, 0.0, 1.0],
            [0.55, 0.0, 0.15, 1.0],
        ]
    )
    return {"colors": colors, "controls": controls, "name": "misfit (clear below z 1)"}


def dominant_label_colors(cell_types) -> dict:
    """The dominant-type Labels layer's dict colormap: label ``i + 1`` = type ``i`` in
    :func:`dominant_colors`, 0 (no bin, no estimate) transparent."""
    colors = dominant_colors(cell_types)
    out = {0: "transparent", None: "transparent"}
    out.update({i + 1: colors[str(t)] for i, t in enumerate(cell_types)})
    return out


def dominant_colors(cell_types) -> dict[str, str]:
    """Distinct categorical colours (tab10/tab20, then hues) per type; no estimate = transparent."""
    import matplotlib
    from matplotlib.colors import hsv_to_rgb, to_hex

    types = [str(t) for t in cell_types]
    n = len(types)
    if n <= 10:
        cols = [matplotlib.colormaps["tab10"](i) for i in range(n)]
    elif n <= 20:
        cols = [matplotlib.colormaps["tab20"](i) for i in range(n)]
    else:
        cols = [hsv_to_rgb((i / n, 0.75 - 0.3 * (i % 2), 0.95)) for i in range(n)]
    out = {t: to_hex(c) for t, c in zip(types, cols)}
    out[NO_ESTIMATE] = "#00000000"
    return out


# --------------------------------------------------------------------------- #
# slides
# --------------------------------------------------------------------------- #


def _obs_features(adata) -> pd.DataFrame:
    feats = pd.DataFrame({"barcode": adata.obs_names.astype(str).to_numpy()})
    for col in adata.obs.columns:
        s = adata.obs[col]
        if (
            isinstance(s.dtype, pd.CategoricalDtype)
            or pd.api.types.is_numeric_dtype(s.dtype)
            or pd.api.types.is_bool_dtype(s.dtype)
        ) and str(col) not in feats:
            feats[str(col)] = s.to_numpy()
    return feats


def slide_layers(
    adata,
    *,
    name: str | None = None,
    path=None,
    library_id: str | None = None,
    reference=None,
    cell_type_key: str | None = None,
) -> list[tuple]:
    """Tissue image (if any) + spots as napari layer-data tuples, in shared world coordinates."""
    lib = display_library(adata, library_id)
    found = io.get_image(adata, lib)
    image, scalef, _ = found if found is not None else (None, None, None)
    name = name or (Path(path).name if path is not None else (lib or "slide"))
    slide_id = uuid.uuid4().hex
    world = {} if (affine := world_affine(adata, lib)) is None else {"affine": affine}
    layers = []
    if image is not None:
        s = 1.0 / float(scalef)
        layers.append(
            (
                np.asarray(image),
                {
                    "name": f"{name} image",
                    "rgb": np.asarray(image).ndim == 3 and np.asarray(image).shape[-1] in (3, 4),
                    "scale": (s, s),
                    "translate": (0.0, 0.0),
                    **world,
                    "metadata": {
                        SLIDE_TAG: {"slide_id": slide_id, "role": "image", "library_id": lib}
                    },
                },
                "image",
            )
        )
    metadata = {
        SLIDE_TAG: {"slide_id": slide_id, "role": "spots", "library_id": lib},
        "adata": adata,
        "path": None if path is None else str(path),
    }
    if reference is not None:
        metadata["reference"] = str(reference)
    if cell_type_key is not None:
        metadata["cell_type_key"] = cell_type_key
    layers.append(
        (
            spots_yx(adata),
            {
                "name": f"{name} spots",
                "features": _obs_features(adata),
                "size": spot_diameter(adata, lib),
                "symbol": spot_symbol(adata, lib),
                "face_color": [1.0, 1.0, 1.0, 0.25],
                "border_color": [1.0, 1.0, 1.0, 0.8],
                "border_width": 0.08,
                "opacity": 1.0,
                **world,
                "metadata": metadata,
            },
            "points",
        )
    )
    return layers


def slide_for_deconvolution(adata, image=None, *, scale=None, translate=None, library_id=None):
    """The slide to deconvolve, with ``image`` (another napari image layer) as its tissue image.

    ``scale``/``translate`` are the image layer's (row, col) world transform; the image must
    share the spots' world coordinates (full-resolution pixels), i.e. isotropic scale and no
    translation, so image pixel = ``spatial / scale``. ``image=None`` returns ``adata``.
    Counts, obs and var are shared with ``adata`` (not copied); ``adata`` is not modified.
    """
    import anndata as ad

    if image is None:
        return adata
    sy, sx = (1.0, 1.0) if scale is None else (float(scale[-2]), float(scale[-1]))
    ty, tx = (0.0, 0.0) if translate is None else (float(translate[-2]), float(translate[-1]))
    if not np.isclose(sy, sx, rtol=1e-3) or sx <= 0:
        raise ImageMismatchError(
            f"The image layer's scale is {sy:g} x {sx:g} (row x col); the graph features need "
            "square pixels. Pick another image layer or untick 'follow the tissue image'."
        )
    if abs(ty) > 0.5 * sy or abs(tx) > 0.5 * sx:
        raise ImageMismatchError(
            f"The image layer is translated by ({ty:g}, {tx:g}); spots and image must share "
            "full-resolution pixel coordinates with the origin at (0, 0)."
        )
    lib = display_library(adata, library_id)
    # only a stored diameter is carried over: an estimate would change the image features
    diameter = None if lib is None else io.spot_diameter(adata, lib, estimate=False)
    scalefactors = {"tissue_hires_scalef": 1.0 / sx}
    if diameter:
        scalefactors["spot_diameter_fullres"] = diameter
    if lib is not None and io.square_bin_size(adata, lib) is not None:
        # Visium HD bins stay square bins of their size for the graph
        stored = io.get_library(adata, lib)[1]["scalefactors"]
        for key in ("bin_size_um", "microns_per_pixel"):
            scalefactors[key] = float(stored[key])
    lib = lib or "napari"
    out = ad.AnnData(
        X=adata.X,
        obs=adata.obs,
        var=adata.var,
        obsm={SPATIAL_KEY: np.asarray(adata.obsm[SPATIAL_KEY])},
    )
    out.uns["spatial"] = {
        lib: {"images": {"hires": np.asarray(image)}, "scalefactors": scalefactors, "metadata": {}}
    }
    io.check_image_covers_spots(out, library_id=lib)
    return out


# --------------------------------------------------------------------------- #
# results
# --------------------------------------------------------------------------- #


def result_layer_name(slide_name: str | None, what: str) -> str:
    """``"<slide> · <what>"`` (a cell type, 'dominant cell type', 'fit error'), or ``what``."""
    return f"{slide_name}{LAYER_NAME_SEPARATOR}{what}" if slide_name else what


def top_types(proportions: pd.DataFrame, n: int = TOP_TYPES_SHOWN) -> np.ndarray:
    """Per spot, its ``n`` largest non-zero types with values: ``"Astro 0.52 · Neuron 0.31"``
    (``NO_ESTIMATE`` for spots without one)."""
    values = proportions.to_numpy(dtype=np.float64)
    types = np.asarray([str(c) for c in proportions.columns], dtype=object)
    order = np.argsort(-np.nan_to_num(values, nan=-1.0), axis=1)[:, :n]
    out = np.empty(len(values), dtype=object)
    for i, (row, best) in enumerate(zip(values, order)):
        parts = [f"{types[j]} {row[j]:.2f}" for j in best if np.isfinite(row[j]) and row[j] > 0]
        out[i] = LAYER_NAME_SEPARATOR.join(parts) if parts else NO_ESTIMATE
    return out


def sample_columns(adata) -> list[str]:
    """obs columns that can split a slide into samples (``library_key``): categorical (or
    string) columns with 2 to 100 values, those whose values are all libraries of
    ``uns['spatial']`` first."""
    libraries = set(map(str, (adata.uns.get("spatial") or {}).keys()))
    matching, other = [], []
    for col in adata.obs.columns:
        s = adata.obs[col]
        if not (isinstance(s.dtype, pd.CategoricalDtype) or pd.api.types.is_object_dtype(s.dtype)):
            continue
        values = set(map(str, pd.unique(s.dropna())))
        if not 2 <= len(values) <= 100:
            continue
        (matching if values <= libraries else other).append(str(col))
    return matching + other


def fine_tuning_note(train_info: dict | None, epochs_asked: int | None) -> str:
    """One sentence on how fine-tuning went, from ``result.info['train']`` ('' without it):
    whether it stopped before ``epochs_asked`` and why, or kept the shipped parameters."""
    if not train_info or not train_info.get("epochs"):
        return ""
    ran, best = int(train_info["epochs"]), int(train_info.get("best_epoch", 0))
    before = train_info.get("val_rmse_initial")
    after = train_info.get("val_rmse")
    gain = ""
    if before and after is not None and np.isfinite(before) and np.isfinite(after):
        gain = f" (validation error {before:.3g} → {after:.3g})"
    if best == 0:
        return (
            f"Fine-tuning ran {ran} epochs without improving on the shipped parameters{gain}; "
            "the shipped parameters were kept."
        )
    if epochs_asked and ran < int(epochs_asked):
        return (
            f"Fine-tuning stopped early, after {ran} of {int(epochs_asked)} epochs: the "
            f"validation error had not improved since epoch {best}, whose parameters are "
            f"used{gain}."
        )
    return f"Fine-tuned for {ran} epochs; the parameters of epoch {best} are used{gain}."


def results_table(
    proportions: pd.DataFrame, fit_error=None, qc=None, diagnostics=None
) -> pd.DataFrame:
    """One row per spot: barcode, every type's proportion, dominant type, fit error, QC, and
    with ``diagnostics`` (``result.diagnostics``) the misfit z and the flag."""
    prop = proportions.astype(np.float64)
    types = [str(c) for c in prop.columns]
    values = prop.to_numpy()
    has = np.isfinite(values).all(1) & (np.nan_to_num(values).sum(1) > 0)
    dom_idx = np.nan_to_num(values, nan=-1.0).argmax(1)
    dominant = np.where(has, np.asarray(types, dtype=object)[dom_idx], NO_ESTIMATE)
    table = pd.DataFrame(values, columns=types)
    table.insert(0, "barcode", prop.index.astype(str).to_numpy())
    table["dominant"] = pd.Categorical(dominant, categories=types + [NO_ESTIMATE])
    table["dominant_proportion"] = np.where(has, values[np.arange(len(values)), dom_idx], np.nan)
    table[FIT_ERROR_COLUMN] = (
        np.full(len(table), np.nan)
        if fit_error is None
        else np.asarray(pd.Series(fit_error).reindex(prop.index), dtype=float)
    )
    table[QC_COLUMN] = (
        np.where(has, "ok", "no estimate")
        if qc is None
        else pd.Series(qc).reindex(prop.index).astype(str).to_numpy()
    )
    if diagnostics is not None:
        diag = pd.DataFrame(diagnostics).reindex(prop.index)
        table[MISFIT_COLUMN] = diag[MISFIT_COLUMN].to_numpy(dtype=float)
        table[FLAGGED_COLUMN] = diag[FLAGGED_COLUMN].fillna(False).to_numpy(dtype=bool)
    return table


def _result_meta(source, role, cell_type, *, types, table, annotated, yx, slide_name, extra=None):
    """A result layer's metadata: its tag and the ONE table (same object in every layer)."""
    meta = {
        RESULT_TAG: {
            "source": source,
            "role": role,
            "cell_type": cell_type,
            "slide_name": slide_name,
        },
        "adata": annotated,
        "cell_types": types,
        TABLE_KEY: table,
        POSITIONS_KEY: yx,
    }
    if extra:
        meta.update(extra)
    return meta


@dataclass(frozen=True)
class ResultIntervals:
    """The proportions' intervals in the result table's row and type order (float32 arrays,
    spots x types; NaN without an estimate) at the stated ``level``."""

    lower: np.ndarray
    upper: np.ndarray
    level: float

    @classmethod
    def of(cls, uncertainty, index, types) -> ResultIntervals:
        """From ``result.uncertainty`` (``lower``/``upper`` DataFrames, ``level``)."""

        def frame(f):
            f = f.set_axis(f.index.astype(str)).set_axis(list(map(str, f.columns)), axis=1)
            return f.reindex(index=list(index), columns=list(types)).to_numpy(np.float32)

        return cls(frame(uncertainty.lower), frame(uncertainty.upper), float(uncertainty.level))


def fit_error_limit(table: pd.DataFrame) -> float:
    """The fit-error colour scale's top: the 99th percentile (1 without fit errors)."""
    fe = table[FIT_ERROR_COLUMN].to_numpy(dtype=float)
    hi = float(np.nanpercentile(fe, 99)) if np.isfinite(fe).any() else 1.0
    return max(hi, 1e-6)


def result_grid(slide, library_id=None):
    """The bins' :class:`~napari_stlnmf.result_rasters.BinGrid` for a slide of square bins
    (Visium HD: ``uns['spatial'][lib]['scalefactors']`` has ``bin_size_um`` and
    ``microns_per_pixel``), else None (round spots, cells: they stay Points)."""
    from .result_rasters import bin_grid

    lib = display_library(slide, library_id)
    side = None if lib is None else io.square_bin_size(slide, lib)
    if side is None:
        return None
    obs = slide.obs
    rows = obs["array_row"].to_numpy() if "array_row" in obs else None
    cols = obs["array_col"].to_numpy() if "array_col" in obs else None
    grid = bin_grid(spots_yx(slide), side, array_rows=rows, array_cols=cols)
    if grid is None and rows is not None:  # array indices of another grid: go by positions
        grid = bin_grid(spots_yx(slide), side)
    return grid


def proportion_values(table: pd.DataFrame, cell_type: str) -> np.ndarray:
    """One type's proportions as float32, 0 where there is no estimate (drawn transparent)."""
    return np.nan_to_num(table[str(cell_type)].to_numpy(dtype=np.float32), nan=0.0)


def dominant_codes(table: pd.DataFrame) -> np.ndarray:
    """The dominant type of each spot as a label: 1 + its index among the types, 0 for none."""
    dom = table["dominant"]
    codes = dom.cat.codes.to_numpy().astype(np.int32) + 1
    codes[(dom == NO_ESTIMATE).to_numpy()] = 0
    return codes


def result_layers(
    proportions: pd.DataFrame,
    fit_error,
    qc,
    slide,
    *,
    source: str | None = None,
    annotated=None,
    visible: str = "first",
    library_id=None,
    slide_name: str | None = None,
    shown: str | None = None,
    rasterise: bool | None = None,
    diagnostics: pd.DataFrame | None = None,
    uncertainty=None,
) -> list[tuple]:
    """The results as three layer-data tuples sharing ONE table: fit error, dominant type and
    one proportion map (on top) showing ``shown`` (default the first type); the dock's
    cell-type picker recolours that map.

    Round spots (Visium SD, cells, the samples) are Points layers. Square bins (Visium HD,
    :func:`result_grid`) are the pixels of their grid (``rasterise=None``: whenever the slide
    has one; False: Points anyway): proportion and fit error as Image layers, the dominant
    type as a Labels layer with a dict colormap, each placed with the grid's ``affine``, so
    their cost does not grow with the number of types or bins drawn.

    The table (:func:`results_table`, barcode x types + dominant + fit error + QC; for Points
    also the hover column ``top``) is ``metadata['stlnmf_table']`` of all three, the same
    object, with ``metadata['stlnmf_positions']`` (the spots' (row, col)); bins keep their
    ``BinGrid`` (``['stlnmf_bins']``) and each pixel's table row (``['stlnmf_index']``).
    ``slide`` gives positions and spot size (its ``obs_names`` must match
    ``proportions.index``); ``annotated`` (the result's AnnData) is kept as ``['adata']`` for
    export. ``visible='first'`` shows only the proportion map, ``'all'`` all three.
    ``slide_name`` prefixes the names (:func:`result_layer_name`). With ``diagnostics``
    (``result.diagnostics``) a fourth layer, the reference misfit (:func:`misfit_colormap`),
    lies above the fit error. With ``uncertainty`` (``result.uncertainty``) the intervals are
    ``metadata['stlnmf_intervals']`` (:class:`ResultIntervals`, one object for all layers) and
    the hover shows them.
    """
    if list(map(str, slide.obs_names)) != list(map(str, proportions.index)):
        proportions = proportions.reindex(slide.obs_names.astype(str))
    types = [str(c) for c in proportions.columns]
    if not types:
        raise ValueError("no cell types in the proportions")
    shown = types[0] if shown is None or str(shown) not in types else str(shown)
    grid = None if rasterise is False else result_grid(slide, library_id)
    table = results_table(proportions, fit_error, qc, diagnostics)
    if grid is None:  # napari's own hover lists the features: the largest types first
        table.insert(0, TOP_TYPES_COLUMN, top_types(proportions))
    table.attrs["cell_types"] = types
    yx = spots_yx(slide)
    source = source or uuid.uuid4().hex
    hi = fit_error_limit(table)
    affine = world_affine(slide, library_id)
    show_all = visible == "all"

    if uncertainty is None or isinstance(uncertainty, ResultIntervals):
        intervals = uncertainty
    else:
        intervals = ResultIntervals.of(uncertainty, proportions.index.astype(str), types)
    extra_all = {} if intervals is None else {INTERVALS_KEY: intervals}

    def meta(role, cell_type=None, extra=None):
        extra = {**extra_all, **(extra or {})}
        out = _result_meta(
            source, role, cell_type, types=types, table=table, annotated=annotated, yx=yx,
            slide_name=slide_name, extra=extra,
        )  # fmt: skip
        out[RESULT_TAG]["fit_error_max"] = hi
        return out

    names = {
        "proportion": result_layer_name(slide_name, shown),
        "dominant": result_layer_name(slide_name, DOMINANT_LAYER),
        "fit_error": result_layer_name(slide_name, FIT_ERROR_LAYER),
        "misfit": result_layer_name(slide_name, MISFIT_LAYER),
    }
    diagnosed = MISFIT_COLUMN in table.columns
    if grid is not None:
        from .result_rasters import index_raster, raster

        to_world = grid.affine if affine is None else affine @ grid.affine
        extra = {BINS_KEY: grid, INDEX_KEY: index_raster(grid)}
        common = {"affine": to_world, "blending": "translucent"}
        labels = np.zeros(grid.shape, dtype=np.int32)
        labels[grid.rows, grid.cols] = dominant_codes(table)
        fit = raster(grid, np.nan_to_num(table[FIT_ERROR_COLUMN].to_numpy(float)), fill=0.0)
        layers = [
            (
                fit,
                {
                    **common,
                    "name": names["fit_error"],
                    "colormap": zero_transparent_colormap(FIT_ERROR_COLORMAP),
                    "contrast_limits": (0.0, hi),
                    "visible": show_all,
                    "metadata": meta("fit_error", extra=extra),
                },
                "image",
            ),
            (
                labels,
                {
                    **common,
                    "name": names["dominant"],
                    "colormap": dominant_label_colors(types),
                    "opacity": 0.8,
                    "visible": show_all,
                    "metadata": meta("dominant", extra=extra),
                },
                "labels",
            ),
            (
                raster(grid, proportion_values(table, shown), fill=0.0),
                {
                    **common,
                    "name": names["proportion"],
                    "colormap": ramp_colormap(),
                    "contrast_limits": (0.0, 1.0),
                    "visible": visible in ("first", "all"),
                    "metadata": meta(PROPORTION_ROLE, shown, extra=extra),
                },
                "image",
            ),
        ]
        if diagnosed:
            z = np.nan_to_num(table[MISFIT_COLUMN].to_numpy(float), nan=0.0)
            misfit = {
                **common,
                "name": names["misfit"],
                "colormap": misfit_colormap(),
                "contrast_limits": (0.0, MISFIT_MAX),
                "visible": show_all,
                "metadata": meta("misfit", extra=extra),
            }
            layers.insert(1, (raster(grid, z, fill=0.0), misfit, "image"))
        return layers

    common = {
        "size": spot_diameter(slide, library_id),
        "symbol": spot_symbol(slide, library_id),
        "border_width": 0.0,
        "opacity": 0.95,
        "features": table,
    }
    if affine is not None:
        common["affine"] = affine
    # layers added later are drawn on top: the proportion map last
    layers = [
        (
            yx,
            {
                **common,
                "name": names["fit_error"],
                "face_color": FIT_ERROR_COLUMN,
                "face_colormap": FIT_ERROR_COLORMAP,
                "face_contrast_limits": (0.0, hi),
                "visible": show_all,
                "metadata": meta("fit_error"),
            },
            "points",
        ),
        (
            yx,
            {
                **common,
                "name": names["dominant"],
                "face_color": "dominant",
                "face_color_cycle": dominant_colors(types),
                "visible": show_all,
                "metadata": meta("dominant"),
            },
            "points",
        ),
        (
            yx,
            {
                **common,
                "name": names["proportion"],
                "face_color": shown,
                "face_colormap": ramp_colormap(),
                "face_contrast_limits": (0.0, 1.0),
                "visible": visible in ("first", "all"),
                "metadata": meta(PROPORTION_ROLE, shown),
            },
            "points",
        ),
    ]
    if diagnosed:
        misfit = {
            **common,
            "name": names["misfit"],
            "face_color": MISFIT_COLUMN,
            "face_colormap": misfit_colormap(),
            "face_contrast_limits": (0.0, MISFIT_MAX),
            "visible": show_all,
            "metadata": meta("misfit"),
        }
        layers.insert(1, (yx, misfit, "points"))
    return layers


def hover_text(
    table: pd.DataFrame, index: int | None, cell_types=None, *, n: int = HOVER_TYPES,
    min_share: float = HOVER_MIN_SHARE, intervals: ResultIntervals | None = None,
) -> str:  # fmt: skip
    """The hover text of row ``index`` of a result table: its barcode, then its ``n`` largest
    types of at least ``min_share`` with their proportions (one per line, largest first; with
    ``intervals`` each with its interval), then the fit error and misfit; '' for ``index`` None
    or out of range."""
    if index is None or not 0 <= int(index) < len(table):
        return ""
    i = int(index)
    types = list(cell_types or table.attrs.get("cell_types") or [])
    row = table.iloc[i]
    lines = [str(row["barcode"])]
    values = np.asarray([row[t] for t in types], dtype=np.float64)
    if not np.isfinite(values).any():
        lines.append(NO_ESTIMATE)
    else:
        order = np.argsort(-np.nan_to_num(values, nan=-1.0), kind="stable")
        shown = [j for j in order[:n] if np.isfinite(values[j]) and values[j] >= min_share]
        for j in shown:
            line = f"{types[j]}  {values[j]:.1%}"
            if intervals is not None and np.isfinite(intervals.lower[i, j]):
                lo, hi = float(intervals.lower[i, j]), float(intervals.upper[i, j])
                line += f"  ({lo:.0%}–{hi:.0%})"
            lines.append(line)
        if intervals is not None:
            lines.append(f"intervals: {intervals.level:.0%}")
        rest = int((np.nan_to_num(values) >= min_share).sum()) - len(shown)
        if rest > 0:
            lines.append(f"… {rest} more ≥ {min_share:.0%}")
    if FIT_ERROR_COLUMN in table.columns and np.isfinite(row[FIT_ERROR_COLUMN]):
        lines.append(f"fit error  {float(row[FIT_ERROR_COLUMN]):.3g}")
    if MISFIT_COLUMN in table.columns and np.isfinite(row[MISFIT_COLUMN]):
        flag = "  poorly explained" if bool(row[FLAGGED_COLUMN]) else ""
        lines.append(f"misfit z  {float(row[MISFIT_COLUMN]):.1f}{flag}")
    return "\n".join(lines)


def result_layers_from_adata(
    adata, *, source=None, library_id=None, slide_name=None
) -> list[tuple]:
    """Result layers of an AnnData that holds ``obsm['stlnmf_proportions']`` ([] otherwise)."""
    if PROPORTIONS_KEY not in adata.obsm:
        return []
    prop = adata.obsm[PROPORTIONS_KEY]
    if not isinstance(prop, pd.DataFrame):
        cell_types = (adata.uns.get("stlnmf") or {}).get("cell_types")
        prop = pd.DataFrame(
            np.asarray(prop),
            index=adata.obs_names,
            columns=None if cell_types is None else list(cell_types),
        )
    prop = prop.set_axis(adata.obs_names.astype(str))
    fit = adata.obs.get(FIT_ERROR_KEY)
    qc = adata.obs.get(QC_KEY)
    if fit is not None:
        fit = fit.set_axis(prop.index)
    if qc is not None:
        qc = qc.set_axis(prop.index)
    diagnostics = None
    z_key, flag_key = f"stlnmf_{MISFIT_COLUMN}", f"stlnmf_{FLAGGED_COLUMN}"
    if z_key in adata.obs and flag_key in adata.obs:  # written by deconvolve(diagnose=True)
        diagnostics = pd.DataFrame(
            {
                MISFIT_COLUMN: adata.obs[z_key].to_numpy(dtype=float),
                FLAGGED_COLUMN: adata.obs[flag_key].to_numpy(dtype=bool),
            },
            index=prop.index,
        )
    uncertainty = None
    if LOWER_KEY in adata.obsm and UPPER_KEY in adata.obsm:  # deconvolve(uncertainty=True)
        level = ((adata.uns.get("stlnmf") or {}).get("uncertainty") or {}).get("level")
        if level is not None:
            # rows are the slide's spots, columns its types: as the proportions
            uncertainty = ResultIntervals(
                np.asarray(adata.obsm[LOWER_KEY], dtype=np.float32),
                np.asarray(adata.obsm[UPPER_KEY], dtype=np.float32),
                float(level),
            )
    return result_layers(
        prop,
        fit,
        qc,
        adata,
        source=source,
        annotated=adata,
        library_id=library_id,
        slide_name=slide_name,
        diagnostics=diagnostics,
        uncertainty=uncertainty,
    )
