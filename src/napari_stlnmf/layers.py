"""Slides and deconvolution results as napari layer-data tuples (pure: no Qt, no napari import).

World coordinates are the slide's full-resolution pixels, in napari's (row, col) = (y, x)
order: spots sit at ``obsm['spatial'][:, ::-1]`` and the tissue image gets
``scale = 1 / scalefactor`` so image pixel ``spatial * scalefactor`` lands on the spot.
Spots are drawn as discs :func:`napari_stlnmf.io.spot_diameter` wide (``spot_diameter_fullres``,
else estimated from the spacing), the same size as in the PNG maps of
:mod:`napari_stlnmf.plotting`; Visium HD bins as squares of their true side,
:func:`napari_stlnmf.io.square_bin_size` (``bin_size_um / microns_per_pixel``).

Layers made here are tagged in ``metadata``:

- ``metadata['stlnmf_slide']``: ``{'slide_id', 'role': 'image'|'spots', 'library_id'}``;
  the spots layer also carries the AnnData (``metadata['adata']``, counts for the widget),
  ``metadata['path']`` and, for samples, ``metadata['reference']``/``['cell_type_key']``.
- ``metadata['stlnmf_result']``: ``{'source': slide_id, 'role': 'cell_type'|'dominant'|
  'fit_error', 'cell_type': name|None}``; ``metadata['adata']`` is the annotated copy with
  ``obsm['stlnmf_proportions']`` (what the writer exports). Re-running replaces layers by
  this tag.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from . import io
from ._constants import FIT_ERROR_KEY, PROPORTIONS_KEY, QC_KEY, SPATIAL_KEY
from .errors import ImageMismatchError, StlnmfError

__all__ = [
    "DOMINANT_LAYER",
    "FIT_ERROR_LAYER",
    "RESULT_TAG",
    "SLIDE_TAG",
    "dominant_colors",
    "result_layers",
    "result_layers_from_adata",
    "results_table",
    "slide_for_deconvolution",
    "slide_layers",
    "spot_diameter",
    "spot_symbol",
    "zero_transparent_colormap",
]

SLIDE_TAG = "stlnmf_slide"
RESULT_TAG = "stlnmf_result"
DOMINANT_LAYER = "dominant cell type"
FIT_ERROR_LAYER = "fit error"
NO_ESTIMATE = "no estimate"
FIT_ERROR_COLUMN = "fit_error"  # feature/CSV column names (short: shown on hover)
QC_COLUMN = "qc"
PROPORTION_COLORMAP = "viridis"
FIT_ERROR_COLORMAP = "magma"


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


def _display_library(adata, library_id=None) -> str | None:
    """The library to show: ``library_id``, the only one, or (several libraries) the first."""
    if not adata.uns.get("spatial"):
        return None
    try:
        return io.get_library(adata, library_id)[0]
    except StlnmfError:
        return next(iter(adata.uns["spatial"]))  # several libraries: show the first


def spot_diameter(adata, library_id=None) -> float:
    """Spot size of the layers, in full-resolution pixels, for the library shown (the first one
    when there are several and ``library_id`` is None): the side of Visium HD bins
    (:func:`napari_stlnmf.io.square_bin_size`), else :func:`napari_stlnmf.io.spot_diameter`."""
    lib = _display_library(adata, library_id)
    side = None if lib is None else io.square_bin_size(adata, lib)
    return side if side is not None else io.spot_diameter(adata, lib)


def spot_symbol(adata, library_id=None) -> str:
    """The napari Points symbol of the spots: ``'square'`` for Visium HD bins, else ``'disc'``."""
    lib = _display_library(adata, library_id)
    return "disc" if lib is None or io.square_bin_size(adata, lib) is None else "square"


def _spots_yx(adata) -> np.ndarray:
    return np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)[:, 1::-1].copy()


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
    lib = _display_library(adata, library_id)
    found = io.get_image(adata, lib)
    image, scalef, _ = found if found is not None else (None, None, None)
    name = name or (Path(path).name if path is not None else (lib or "slide"))
    slide_id = uuid.uuid4().hex
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
            _spots_yx(adata),
            {
                "name": f"{name} spots",
                "features": _obs_features(adata),
                "size": spot_diameter(adata, lib),
                "symbol": spot_symbol(adata, lib),
                "face_color": [1.0, 1.0, 1.0, 0.25],
                "border_color": [1.0, 1.0, 1.0, 0.8],
                "border_width": 0.08,
                "opacity": 1.0,
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
            "square pixels. Pick another image layer or untick 'use the image for the graph'."
        )
    if abs(ty) > 0.5 * sy or abs(tx) > 0.5 * sx:
        raise ImageMismatchError(
            f"The image layer is translated by ({ty:g}, {tx:g}); spots and image must share "
            "full-resolution pixel coordinates with the origin at (0, 0)."
        )
    lib = _display_library(adata, library_id)
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


def results_table(proportions: pd.DataFrame, fit_error=None, qc=None) -> pd.DataFrame:
    """One row per spot: barcode, every type's proportion, dominant type, fit error, QC."""
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
    return table


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
) -> list[tuple]:
    """Per-type maps, dominant type and fit error as Points layer-data tuples.

    ``slide`` gives the spot positions and diameter (its ``obs_names`` must match
    ``proportions.index``). ``annotated`` (the result's AnnData copy) is kept in each layer's
    ``metadata['adata']`` for export. ``visible='first'`` shows only the first type's map.
    """
    if list(map(str, slide.obs_names)) != list(map(str, proportions.index)):
        proportions = proportions.reindex(slide.obs_names.astype(str))
    table = results_table(proportions, fit_error, qc)
    types = [str(c) for c in proportions.columns]
    yx = _spots_yx(slide)
    size = spot_diameter(slide, library_id)
    source = source or uuid.uuid4().hex

    def meta(role, cell_type=None):
        return {
            RESULT_TAG: {"source": source, "role": role, "cell_type": cell_type},
            "adata": annotated,
            "cell_types": types,
        }

    symbol = spot_symbol(slide, library_id)
    common = {"size": size, "symbol": symbol, "border_width": 0.0, "opacity": 0.95}
    cmap = zero_transparent_colormap()
    layers = []
    for i, t in enumerate(types):
        layers.append(
            (
                yx,
                {
                    **common,
                    "features": table.copy(),
                    "name": t,
                    "face_color": t,
                    "face_colormap": cmap,
                    "face_contrast_limits": (0.0, 1.0),
                    "visible": visible == "all" or (visible == "first" and i == 0),
                    "metadata": meta("cell_type", t),
                },
                "points",
            )
        )
    layers.append(
        (
            yx,
            {
                **common,
                "features": table.copy(),
                "name": DOMINANT_LAYER,
                "face_color": "dominant",
                "face_color_cycle": dominant_colors(types),
                "visible": visible == "all",
                "metadata": meta("dominant"),
            },
            "points",
        )
    )
    fe = table[FIT_ERROR_COLUMN].to_numpy(dtype=float)
    hi = float(np.nanpercentile(fe, 99)) if np.isfinite(fe).any() else 1.0
    layers.append(
        (
            yx,
            {
                **common,
                "features": table.copy(),
                "name": FIT_ERROR_LAYER,
                "face_color": FIT_ERROR_COLUMN,
                "face_colormap": FIT_ERROR_COLORMAP,
                "face_contrast_limits": (0.0, max(hi, 1e-6)),
                "visible": visible == "all",
                "metadata": meta("fit_error"),
            },
            "points",
        )
    )
    # layers added later are drawn on top: put the first type's map last
    return layers[len(types) :][::-1] + layers[: len(types)][::-1]


def result_layers_from_adata(adata, *, source=None, library_id=None) -> list[tuple]:
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
    return result_layers(
        prop, fit, qc, adata, source=source, annotated=adata, library_id=library_id
    )
